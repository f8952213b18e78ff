"""Where a run came from: the commit, the config's digest, the seed, when it started, how long it ran,
the machine and the exit code. `lumo demo` puts it at the head of summary.json and report.html, so a
report read weeks later says what produced it."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

# The fields a complete header has (summary.json's "header"); check() names any that are missing.
FIELDS = ("commit", "version", "config", "config_sha256", "seed", "started_utc", "wall_s", "machine", "exit_code")
DIGEST_CHARS = 16  # the short form shown in report.html; summary.json keeps all 64


def _git(root: Path, *args: str) -> str | None:
    """`git -C root ARGS`'s output, or None where git is absent, fails or hangs."""
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def source() -> dict:
    """The package's commit when it runs from a git checkout (and whether tracked files differ from it),
    else None, with the installed version either way. Only the checkout lumo_ray itself sits in counts:
    an installed copy inside some other repository (a venv in a project) is not that repository's commit."""
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[2]
    try:
        ver = version("lumo-ray")
    except PackageNotFoundError:
        ver = None
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return {"commit": None, "dirty": None, "version": ver}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": _git(root, "rev-parse", "HEAD"), "dirty": None if status is None else bool(status), "version": ver}


def machine() -> dict:
    """CPU model and count, GPUs (none on a CPU-only torch), OS, Python, torch and Ray versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model here; platform.processor() is often just 'x86_64'
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        ray = version("ray")
    except PackageNotFoundError:
        ray = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "cpus_usable": usable, "gpus": gpus,
            "os": platform.platform(terse=True), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray}


def start(config_file: Path, seed: int) -> dict:
    """The header as a run starts: wall time and exit code are filled in by finish(). config_file: the
    resolved config the run wrote (its sha256 is the digest, so `sha256sum config.yaml` checks it)."""
    config_file = Path(config_file)
    return {**source(), "config": config_file.name, "config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest(),
            "seed": seed, "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": None, "machine": machine(), "exit_code": None, "_t0": time.monotonic()}


def finish(head: dict, exit_code: int | None) -> dict:
    """A copy with the wall time so far and the exit code (None: still running)."""
    out = {k: v for k, v in head.items() if not k.startswith("_")}
    return {**out, "wall_s": round(time.monotonic() - head["_t0"], 1), "exit_code": exit_code}


def check(head: dict) -> list[str]:
    """What a finished header lacks: a missing field, or a commit and a version both unknown."""
    missing = [f"missing {k}" for k in FIELDS if k not in head or (head[k] is None and k not in ("commit", "version"))]
    if head.get("commit") is None and head.get("version") is None:
        missing.append("neither a commit nor a version")
    return missing


def rows(head: dict) -> list[tuple[str, str]]:
    """The header as labelled rows (name, value with its unit) for report.html."""
    m = head.get("machine") or {}
    if head.get("commit"):
        commit = head["commit"] + (" (with uncommitted changes to tracked files)" if head.get("dirty") else "")
    else:
        commit = f"not a git checkout: installed lumo-ray {head.get('version') or '(version unknown)'}"
    code = head.get("exit_code")
    verdict = {None: "still running", 0: "0 (every stage passed)", 1: "1 (a stage failed: a gate, or an error)",
               2: "2 (a problem with the input)", 130: "130 (interrupted)"}
    cpus = f"{m.get('cpus')} CPUs" + (f", {m['cpus_usable']} usable" if m.get("cpus_usable") not in (None, m.get("cpus")) else "")
    wall = head.get("wall_s")
    return [("lumo_ray commit", commit),
            ("config digest", f"{(head.get('config_sha256') or '?')[:DIGEST_CHARS]} (sha256 of {head.get('config', '?')}, "
                              f"the resolved config, first {DIGEST_CHARS} hex digits)"),
            ("seed (demo.seed)", str(head.get("seed"))),
            ("started (UTC)", str(head.get("started_utc"))),
            ("wall time", "?" if wall is None else f"{wall:.1f} s ({wall / 60:.1f} min)"),
            ("exit code", verdict.get(code, str(code))),
            ("machine", f"{m.get('cpu')}, {cpus}; GPU: {', '.join(m.get('gpus') or []) or 'none'}; {m.get('os')}"),
            ("software", f"Python {m.get('python')}, torch {m.get('torch')}, Ray {m.get('ray')}")]


def exit_code_of(e: BaseException) -> int:
    """The code `lumo` returns for an exception that escapes a command (cli/main.py): 130, 2 or 1."""
    from ..errors import is_user_error, unwrap

    if isinstance(e, KeyboardInterrupt):
        return 130
    return 2 if is_user_error(unwrap(e)) else 1
