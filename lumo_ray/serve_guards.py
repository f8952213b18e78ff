"""What keeps `lumo serve` closed when it says so, without Ray or torch (the CLI checks them before
anything starts; servers/generate.py's Gateway applies them to every request): the token file, the
bind check, the bearer match and the access log.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from .config import ServeConfig


def read_token(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace dropped), or UserError: a missing, unreadable or
    empty file, or a token an Authorization header cannot carry, refuses to start instead of serving open."""
    from .errors import UserError

    todo = "write the bearer token (one line of printable ASCII) into it, or drop --token-file"
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError("token file", path, f"cannot read it ({getattr(e, 'strerror', None) or e})", todo) from None
    if not token:
        raise UserError("token file", path, "empty: the server would be open to anyone", todo)
    if not all(33 <= ord(c) < 127 for c in token):
        raise UserError("token file", path, "the token has spaces, line breaks or non-ASCII characters, which an "
                        "Authorization header cannot carry", todo)
    return token


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name or 0.0.0.0-like wildcard: beyond this machine
        return False


def check_binding(host: str, port: int, token: str, insecure: bool) -> str:
    """"" for a loopback host or a token. Beyond loopback without a token: UserError (exit 2), unless
    `insecure`, then the warning line to print."""
    from .errors import UserError

    if token or is_loopback(host):
        return ""
    why = f"serves every network that reaches port {port} and no bearer token is set: anyone there can generate"
    if not insecure:
        raise UserError("serve.host", host, why,
                        "give --token-file, bind 127.0.0.1, or pass --insecure to serve it open")
    return f"[serve] WARNING: {host}:{port} {why} (--insecure)"


def bearer_ok(header: str, token: str) -> bool:
    """`Authorization: <scheme> <credentials>` carries the token: the scheme matched case-insensitively
    (RFC 9110), the token in constant time."""
    scheme, _, cred = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), token.encode())


def access_log_path(limits: ServeConfig, run_dir: str) -> Path:
    """serve.access_log, else serve/access.log in the run directory (in the current one for a run URI)."""
    from .storage import is_uri

    if limits.access_log:
        return Path(limits.access_log).expanduser().absolute()
    base = Path.cwd() if is_uri(run_dir) else Path(run_dir).expanduser().absolute()
    return base / "serve" / "access.log"


def open_access_log(path: Path):
    """The access log opened for appending, line-buffered; a symlink at its name is refused (O_NOFOLLOW),
    never followed. OSError when it cannot be opened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "a", buffering=1, encoding="ascii")


def _field(value: str, n: int) -> str:
    """A request's own string as one printable-ASCII token (no space, quote or line break): a client
    cannot forge or split a log line."""
    return quote(value[:n], safe="/:@!$&'()*+,;=-._~", errors="backslashreplace") or "-"


def access_line(when: float, client: str, method: str, route: str, status: int, seconds: float,
                request_id: str) -> str:
    """One access-log line: `2025-01-02T03:04:05.678Z 127.0.0.1:5000 "POST /v1/generate" 200 412.3ms id=...`.
    The route is the path without its query; headers (the token) and bodies are never logged."""
    t = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return (f'{t} {_field(client, 64)} "{_field(method, 16)} {_field(route, 200)}" {int(status)} '
            f"{1000 * seconds:.1f}ms id={_field(request_id, 64)}")
