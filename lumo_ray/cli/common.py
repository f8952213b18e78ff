"""What every command shares: its config and how it ends on a gate's verdict."""
from __future__ import annotations

from ..config import LumoConfig, load_config


def command_config(args, defaults: list[str] | None = None, sets: list[str] | None = None) -> LumoConfig:
    """--config (default: the embedded tiny preset) with the command's own `defaults` under the file
    and --set (or `sets`, when the command adds its own) over it."""
    sets = getattr(args, "set", None) or [] if sets is None else sets
    return load_config(LumoConfig, getattr(args, "config", None), sets, defaults=defaults)


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def verdict(gate: str, ok: bool, report) -> int:
    """'<gate> PASS: <report>' and the exit code (1 when the gate failed)."""
    print(f"{gate} {mark(ok)}: {report}")
    return 0 if ok else 1
