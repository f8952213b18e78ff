"""Execution helpers shared by library code (no Ray)."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with exactly `n` intra-op threads, then restore. On CPU, float rounding depends on the
    thread count, and codecs' nearest-code searches can flip on it: encoding runs under the configured
    count (the random presets are built thread-independently, codecs/exact_init.py)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def assigned_device(gpu_ids: list, visible: str | None = None) -> torch.device:
    """The torch device of a Ray unit that Ray gave `gpu_ids` (ray.get_gpu_ids()): cuda:<local index> of
    the first when a GPU was given and CUDA works here, else cpu (a fake GPU, or a CPU-only torch).
    visible: CUDA_VISIBLE_DEVICES (default: this process's), where Ray lists the node's GPUs the unit sees."""
    import os

    if not gpu_ids or not torch.cuda.is_available():
        return torch.device("cpu")
    seen = (os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible).split(",")
    first = str(gpu_ids[0])
    return torch.device(f"cuda:{seen.index(first) if first in seen else 0}")


def rate_eta(done: int, total: int, t0: float, start: int = 0, unit: str = "steps") -> str:
    """'12.3 steps/s, ETA 40 s' for a progress line: `done - start` units since t0 (time.time()), of total."""
    import time

    secs = max(time.time() - t0, 1e-9)
    rate = max(done - start, 0) / secs
    eta = (total - done) / rate if rate > 0 else float("inf")
    return f"{rate:.1f} {unit}/s, ETA {eta:.0f} s" if eta != float("inf") else f"{rate:.1f} {unit}/s"


class Progress:
    """Progress of a loop that runs in this process. On a terminal (stdout a TTY and the log the
    console: print, or `console=True` for a print wrapper): one tqdm bar redrawn in place, with count,
    rate and ETA. Elsewhere (CI, `ray job logs`, a pipe, a caller's own log): the caller's plain line
    at the first update, then whenever `every` more items are done (default a tenth), and at the end."""

    def __init__(self, total: int, desc: str, unit: str, log: Callable[[str], None] = print,
                 every: int | None = None, console: bool | None = None):
        self.total, self.log, self.last = total, log, None
        self.every = every or max(1, total // 10)
        self.bar = None
        if (log is print if console is None else console) and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stdout, dynamic_ncols=True)

    def update(self, done: int, line: Callable[[], str]) -> None:
        """`done` items so far; line() builds the plain line when one is due (not on a terminal)."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif self.last is None or done - self.last >= self.every or done == self.total:
            self.last = done
            self.log(line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
