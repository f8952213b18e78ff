"""The one training loop (`run_steps` over a `Workload`: the VLM, the base LM, the token LM / stage 4)
and what it shares step to step: the LR schedule, RNG state, the micro-batch split, when a step logs /
evaluates / checkpoints, activation checkpointing, and fault injection for the restart tests."""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------------
# The one loop: every workload's steps (run_steps), over what the workload answers (Workload)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Due:
    """What a finished step is: a log step (every log_every, the last), an eval step (every eval_every,
    the last), a checkpoint step (every ckpt_every, the last), the last, the first of this start (a
    progress line only: reports and throughput windows keep to the log / eval / checkpoint steps)."""
    log: bool
    eval: bool
    ckpt: bool
    last: bool
    first: bool = False


class Workload:
    """What the one loop trains. A workload builds its state when constructed (model, optimizer, data
    stream, the step it resumes at: `start`) and answers the loop; the loop owns the order, the cadence,
    progress lines, reports, tracking, fault injection, the loss history and the steps' memory.

    The optimizer step itself (micro-batches, loss weighting, clipping, the optimizer) stays with the
    workload: the three weight their loss differently (the base LM per micro-batch, the token LM per
    micro-batch by tokens, the VLM by tokens over the global batch), and each keeps its losses exact."""
    start = 0

    def before_step(self, step: int) -> None:
        """Before step `step` (0-based) runs: the VLM notes an epoch's data at its first step."""

    def train_step(self, step: int) -> dict:
        """One optimizer step (0-based `step`); its report row, with 'loss'."""
        raise NotImplementedError

    def evaluate(self, done: int, due: Due) -> dict:
        """After step `done` (1-based): what its eval adds to the report row ({} when none)."""
        return {}

    def save(self, done: int) -> Optional[Path]:
        """A checkpoint of step `done` (a checkpoint step); the directory to report, None on a rank that
        reports none."""
        return None

    def after_step(self, done: int, due: Due, rep: dict, ck: Optional[Path]) -> dict:
        """After the checkpoint (an interrupted run can resume): golden generations, a Tune hook."""
        return {}

    def line(self, done: int, rep: dict, rate) -> str:
        """Rank 0's progress line of a log step and of the run's first step."""
        return f"step {done} loss {rep['loss']:.4f} ({rate(done)})"

    def tracked(self, rep: dict) -> dict:
        """The scalars the tracker (TensorBoard / MLflow) gets for the step."""
        return rep

    def report(self, ctx, done: int, due: Due, rep: dict, ck: Optional[Path]) -> None:
        """The step's report to the context (Ray Train, a Tune trial, a test): on log / eval /
        checkpoint steps, the same on every rank (a Ray Train report is a round trip), every step in one
        process."""
        if ctx.report_every_step or due.log or due.eval or due.ckpt:
            ctx.report(rep, ck)


@dataclass
class Steps:
    """What run_steps measured: the loss per step, the peak RSS while steps ran, the wall seconds, the
    step reached."""
    history: list
    steps_peak: float
    secs: float
    step: int


def run_steps(w: Workload, ctx, t, stop: int, run_dir: Path, tracker, say: Callable) -> Steps:
    """Run workload `w` from its `start` to step `stop` under train section `t` (its log_every,
    eval_every, ckpt_every, fault injection): per step train, evaluate, checkpoint, after-step, then rank
    0's progress line (log steps and the first: output from the first step), the report and the
    tracker's scalars."""
    from .metrics import RssPeak
    from lumo_ray.runtime import Rate

    t0, rss, history = time.time(), RssPeak(), []
    rate = Rate(stop, w.start, t0=t0)  # a resumed run's rate counts the steps of this start
    done = w.start
    for step in range(w.start, stop):
        w.before_step(step)
        inject_fault(t, step, ctx.rank, run_dir, ctx)
        rss.measuring(True)
        rep = w.train_step(step)
        rss.measuring(False)
        done, last = step + 1, step + 1 == stop
        history.append(rep["loss"])
        d = Due(log=due(done, t.log_every, last), eval=due(done, t.eval_every, last),
                ckpt=due(done, t.ckpt_every, last), last=last, first=done == w.start + 1)
        rep.update(w.evaluate(done, d))
        ck = w.save(done) if d.ckpt else None
        rep.update(w.after_step(done, d, rep, ck))
        if ctx.rank == 0 and (d.log or d.first):
            say(w.line(done, rep, rate))
        w.report(ctx, done, d, rep, ck)
        if tracker is not None:
            tracker.log(done, w.tracked(rep))
    return Steps(history, rss.close(), time.time() - t0, done)


@dataclass(frozen=True)
class Cadence:
    """The cadence of a workload with no train section of its own (the tiny codecs' fits): progress
    lines every log_every steps, no evals or checkpoints between."""
    log_every: int
    eval_every: int = 0
    ckpt_every: int = 0
