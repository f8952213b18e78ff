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
