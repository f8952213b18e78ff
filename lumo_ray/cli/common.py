"""What every command shares: its parser (the user-error contract), numeric flag ranges, the Ray
address check, its config and how it ends on a gate's verdict."""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path

from ..config import LumoConfig, load_config
from ..config.load import set_item
from ..errors import RAY_TOKEN_TODO, UserError


def near(word: str, names) -> str | None:
    """The name the user most likely meant: one that starts with `word`, else the closest spelling."""
    names = [n for n in names if n]
    starts = [n for n in names if n.startswith(word) and word]
    if len(starts) == 1:
        return starts[0]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return close[0] if close else None


class LumoParser(argparse.ArgumentParser):
    """argparse under the user-error contract: every parse error is one line on stderr, `error: <command>:
    <what>; <what to do>`, exit 2 (no usage block), with "did you mean" where a near name exists."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self._commands() is None:  # the innermost parser: what it does not know is a mistake
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    def _commands(self):
        return next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)

    def _flags(self) -> list[str]:
        return [o for o in self._option_string_actions if o.startswith("--")]

    def _unknown_flags(self) -> list[str]:
        return [t.split("=", 1)[0] for t in getattr(self, "_argv", []) if t.startswith("--")
                and t.split("=", 1)[0] not in self._option_string_actions]

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {self._explain(message)}\n")
        sys.exit(2)

    def _explain(self, message: str) -> str:
        options = f"`{self.prog} --help` lists the options"
        cmds = self._commands()
        m = re.match(r"the following arguments are required: (.*)", message)
        if m:
            missing = m.group(1).split(", ")
            if cmds is not None and cmds.dest in missing:
                return f"a command is required: {', '.join(cmds.choices)}; `{self.prog} <command> --help` tells more"
            for flag in missing:  # a misspelt required flag reads as missing: name the misspelling
                for wrong in self._unknown_flags():
                    if near(wrong, [flag]) == flag:
                        return f"missing {flag}: did you mean {flag} instead of {wrong}?"
            return f"missing {', '.join(missing)}; {options}"
        m = re.match(r"argument (\S+): invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if m:
            name, value = m.group(1), m.group(2)
            choices = re.findall(r"'([^']*)'", m.group(3))
            guess = near(value, choices)
            what = f"unknown command '{value}'" if cmds is not None and name in (cmds.dest, cmds.metavar) \
                else f"{name}: invalid choice '{value}'"
            return what + (f"; did you mean '{guess}'? (choices: {', '.join(choices)})" if guess
                           else f"; choose from {', '.join(choices)}")
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            extras = m.group(1).split()
            flag = next((t.split("=", 1)[0] for t in extras if t.startswith("-")), None)
            if flag is None:
                return f"unexpected argument '{extras[0]}'; {options}"
            guess = near(flag, self._flags())
            return f"unknown option {flag}; " + (f"did you mean {guess}?" if guess else options)
        return f"{message}; `{self.prog} --help` tells more"


def require_input(what: str, path, todo: str, folder: bool) -> None:
    """An input that must exist as a folder (or a file): a UserError before anything is written."""
    from ..storage import locate

    loc = locate(path)
    if not loc.exists():
        raise UserError(what, path, "not found", todo)
    if loc.is_dir() != folder:
        raise UserError(what, path, "is a file, not a folder" if folder else "is a folder, not a file", todo)


def _number(kind, lo, strict: bool, hi=None):
    word = {int: "an integer", float: "a number"}[kind]
    bound = (f"> {lo}" if strict else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")

    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {word} {bound}, got {s!r}") from None
        if not (v > lo if strict else v >= lo) or (hi is not None and not v <= hi):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {bound}, got {s}")
        return v

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


# argparse `type=` of numeric flags: an out-of-range value is a parse error (one line, exit 2)
count = _number(int, 0, strict=False)          # 0, 1, 2, ... (also seeds)
positive_int = _number(int, 0, strict=True)    # 1, 2, ...
positive_float = _number(float, 0.0, strict=True)
fraction = _number(float, 0.0, strict=True, hi=1.0)  # (0, 1]: a probability mass such as top-p
port = _number(int, 0, strict=True, hi=65535)


# -- a Ray cluster with token authentication ---------------------------------------------------------
# Ray (2.52+) clusters may require a token on every GCS call (RAY_AUTH_MODE=token). Without the right one
# ray.init retries for about 20 s, printing a C++ warning per try, then raises a ConnectionError that does
# not say which token is wanted; one unauthenticated gRPC call finds that out in milliseconds.

_GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def _ray_token() -> tuple[str | None, str]:
    """The token Ray would send and where it comes from, in Ray's order: RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    env = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env:
        return env, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    p = Path(named) if named else Path.home() / ".ray" / "auth_token"
    token = p.read_text(errors="replace").strip() if p.is_file() else ""
    return (token, f"RAY_AUTH_TOKEN_PATH ({p})" if named else str(p)) if token else (None, "")


def check_ray_address(address: str, timeout: float = 2.0) -> None:
    """Before Ray connects to `address` (host:port of a cluster's GCS): when the cluster wants a token,
    a UserError unless the token this process would send is accepted. With an accepted token and
    RAY_AUTH_MODE unset, turns token mode on (Ray sends no token otherwise when given an address).
    Any other answer (no cluster there, TLS, a Ray Client ray:// address) is left to Ray."""
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", address or ""):
        return
    import grpc

    def answer(token):
        with grpc.insecure_channel(address) as ch:
            try:
                ch.unary_unary(_GCS_PROBE)(b"", timeout=timeout,
                                           metadata=[("authorization", f"Bearer {token}")] if token else None)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

    if answer(None) != grpc.StatusCode.UNAUTHENTICATED:
        return
    token, source = _ray_token()
    if token is None:
        raise UserError("Ray cluster", address, "it uses token authentication and no token is set", RAY_TOKEN_TODO)
    if answer(token) == grpc.StatusCode.UNAUTHENTICATED:
        raise UserError("Ray cluster", address, f"it rejected the token from {source}", RAY_TOKEN_TODO)
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode.lower() not in ("", "token"):
        raise UserError("Ray cluster", address, f"it uses token authentication and RAY_AUTH_MODE={mode}",
                        "set RAY_AUTH_MODE=token")
    os.environ["RAY_AUTH_MODE"] = "token"


def command_config(args, defaults: list[str] | None = None, sets: list[str] | None = None,
                   aliases: dict[str, str] | None = None) -> LumoConfig:
    """--config (default: the embedded tiny preset) with the command's own `defaults` under the file
    and --set (or `sets`, when the command adds its own) over it. The one precedence: dataclass default
    -> the command's defaults -> config file -> --set. `aliases` {flag: config key}: a command's named
    flags (`--out`, `--shards`, ...) are --set items of those keys, after the user's --set, so a flag given
    wins over a --set of the same key."""
    sets = getattr(args, "set", None) or [] if sets is None else sets
    sets = list(sets) + alias_sets(args, aliases or {})
    cfg = load_config(LumoConfig, getattr(args, "config", None), sets, defaults=defaults)
    book = cfg.uti.image.codebook
    if book and "://" not in book:  # Ray workers run elsewhere: hand them an absolute path
        cfg.uti.image.codebook = str(Path(book).resolve())
    return cfg


def alias_sets(args, aliases: dict[str, str]) -> list[str]:
    """`--set` items (config.load.set_item) of the flags given (None / empty: not given)."""
    given = {flag: getattr(args, flag, None) for flag in aliases}
    return [set_item(aliases[f], v) for f, v in given.items() if v is not None and v != [] and v != ""]


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def verdict(gate: str, ok: bool, report) -> int:
    """'<gate> PASS: <report>' and the exit code (1 when the gate failed)."""
    print(f"{gate} {mark(ok)}: {report}")
    return 0 if ok else 1


def onnx_option(p) -> None:
    p.add_argument("--onnx", help="run the gate on this ONNX export of the run (model.onnx or model.int8.onnx of "
                                  "`lumo export --format onnx`) instead of its PyTorch model")


def with_onnx(run, onnx):
    """The run with its model replaced by an ONNX export of it (onnxruntime), when one is given."""
    if not onnx:
        return run
    from ..onnx_lm import load_onnx_lm

    run.model = load_onnx_lm(onnx, run.ts)
    run.name = f"{run.name} (onnxruntime: {onnx})"
    return run
