"""What every command shares: its config and how it ends on a gate's verdict."""
from __future__ import annotations

from pathlib import Path

from ..config import LumoConfig, load_config


def command_config(args, defaults: list[str] | None = None, sets: list[str] | None = None) -> LumoConfig:
    """--config (default: the embedded tiny preset) with the command's own `defaults` under the file
    and --set (or `sets`, when the command adds its own) over it."""
    sets = getattr(args, "set", None) or [] if sets is None else sets
    cfg = load_config(LumoConfig, getattr(args, "config", None), sets, defaults=defaults)
    book = cfg.uti.image.codebook
    if book and "://" not in book:  # Ray workers run elsewhere: hand them an absolute path
        cfg.uti.image.codebook = str(Path(book).resolve())
    return cfg


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
