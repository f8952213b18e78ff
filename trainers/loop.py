"""What every training loop shares step to step: the LR schedule, RNG state, the micro-batch split,
when a step logs / evaluates / checkpoints (and how an LM step ends), activation checkpointing, and
fault injection for the restart tests."""
from __future__ import annotations

import math
import os
import random
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from lumo_ray.config.lm import TrainConfig

HOLD_S = 300  # train.hold_at_step: long enough for a test to kill a node, short enough to end a forgotten run


def lr_lambda(warmup: int, steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup over `warmup` steps, then cosine down to min_ratio x the peak at `steps`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        prog = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def make_scheduler(opt: torch.optim.Optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    """t: a train section (warmup_steps, steps, min_lr_ratio)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))


def rng_state() -> dict:
    """Every generator's state as JSON (torch's byte states as hex): a checkpoint's state.json."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state().numpy().tobytes().hex(),
            "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(words), gauss_next],
            "cuda": ([t.numpy().tobytes().hex() for t in torch.cuda.get_rng_state_all()]
                     if torch.cuda.is_available() else None)}


def set_rng_state(s: dict) -> None:
    def byte_state(h: str) -> torch.Tensor:
        return torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8)

    torch.set_rng_state(byte_state(s["torch"]))
    kind, key, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    version, words, gauss_next = s["python"]
    random.setstate((version, tuple(words), gauss_next))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([byte_state(h) for h in s["cuda"]])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def checkpoint_activations(model: torch.nn.Module, on: bool) -> None:
    """train.activation_checkpointing: each decoder layer recomputes its activations in the backward
    pass (non-reentrant, so frozen inputs and LoRA keep their gradients); no KV cache while training."""
    if not on:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper: its model
    base.config.use_cache = False
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def due(step: int, every: int, last: bool = False) -> bool:
    """Whether `step` (1-based, just finished) is one of every `every` steps (0: never), or the last."""
    return last or (every > 0 and step % every == 0)


def micro_batch(t: TrainConfig, world_size: int) -> int:
    """Each worker's batch: global_batch split exactly over the workers and grad_accum."""
    per = t.global_batch // (world_size * t.grad_accum)
    if per < 1 or per * world_size * t.grad_accum != t.global_batch:
        raise ValueError(f"global_batch {t.global_batch} is not divisible by num_workers {world_size} x "
                         f"grad_accum {t.grad_accum}")
    return per


def end_of_step(ctx, t: TrainConfig, step: int, rep: dict, ck_dir: Optional[Path], tracker, log, line: Callable[[], str]) -> None:
    """What every LM step ends with: rank 0's progress line every log_every steps, a report on the
    log / eval / checkpoint steps (every step in one process), the tracker's scalars."""
    last = step == t.steps
    if ctx.rank == 0 and due(step, t.log_every, last):
        log(line())
    if ctx.report_every_step or last or any(due(step, k) for k in (t.log_every, t.eval_every, t.ckpt_every)):
        ctx.report(rep, ck_dir)
    if tracker is not None:
        tracker.log(step, rep)


def inject_fault(t, step: int, rank: int, run_dir: Path, ctx) -> None:
    """The restart tests' faults, once per run (a marker file in the run directory): train.fail_at_step
    kills rank 0's process (SIGKILL: a real crash, not an exception); train.hold_at_step stalls it
    HOLD_S seconds while the other ranks wait in their next collective (a node can be killed then)."""
    for at, marker, act in ((getattr(t, "fail_at_step", None), ".failed_once", "killed"),
                            (getattr(t, "hold_at_step", None), ".held_once", "held")):
        if at is None or step != at or rank != 0 or (run_dir / marker).exists():
            continue
        (run_dir / marker).write_text(f"{act} at step {step}\n")
        ctx.sync()  # a restarted worker may stage a fresh copy of a URI run directory
        if act == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(HOLD_S)
