"""Execution helpers shared by library code (no Ray)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with exactly `n` intra-op threads, then restore. On CPU, float rounding depends on the
    thread count, and codecs' nearest-code searches can flip on it; building presets (whose codebooks
    are scaled from encoder outputs) and encoding both run under the configured count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def rate_eta(done: int, total: int, t0: float, start: int = 0, unit: str = "steps") -> str:
    """'12.3 steps/s, ETA 40 s' for a progress line: `done - start` units since t0 (time.time()), of total."""
    import time

    secs = max(time.time() - t0, 1e-9)
    rate = max(done - start, 0) / secs
    eta = (total - done) / rate if rate > 0 else float("inf")
    return f"{rate:.1f} {unit}/s, ETA {eta:.0f} s" if eta != float("inf") else f"{rate:.1f} {unit}/s"
