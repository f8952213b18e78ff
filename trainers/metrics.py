"""What a run measures besides its loss: resident memory (sampled peak), the max over ranks, and
throughput (tokens/s, MFU)."""
from __future__ import annotations

import time
from typing import Optional

import torch


def rss_gb() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RssPeak:
    """The peak resident memory of this process while training steps run, sampled every 10 ms by a
    thread (ru_maxrss would also hold the model's build before sharding and the checkpoint gathers)."""

    def __init__(self):
        import threading

        self.peak, self._on, self._stop = 0.0, threading.Event(), threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.wait(0.01):
            if self._on.is_set():
                self.peak = max(self.peak, proc.memory_info().rss / 2**30)

    def measuring(self, on: bool) -> None:
        (self._on.set if on else self._on.clear)()

    def close(self) -> float:
        self._stop.set()
        return self.peak


def max_over_ranks(x: float, ctx) -> float:
    """The largest of every rank's x (on the context's device: NCCL reduces only CUDA tensors)."""
    t = torch.tensor([x], dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


class Throughput:
    """Tokens/s of this worker between two log steps, and MFU where the device's peak is known
    (lumo_ray/flops.py). The caller counts tokens (real, not padding), target tokens and sequences as
    it trains, and optionally the input positions computed (padding included): then pad_fraction, the
    share of computed positions that were padding since the last report."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.t, self.tokens, self.positions = time.time(), 0, 0

    def report(self, tokens: int, targets: int, seqs: int, positions: Optional[int] = None) -> dict:
        from lumo_ray.flops import flops_per_token, mfu

        now = time.time()
        rate = (tokens - self.tokens) / max(now - self.t, 1e-9)
        out = {}
        if positions is not None and positions > self.positions:
            out["pad_fraction"] = 1.0 - (tokens - self.tokens) / (positions - self.positions)
            self.positions = positions
        self.t, self.tokens = now, tokens
        per_token = flops_per_token(self.model, max(1, tokens // max(seqs, 1)), targets / max(tokens, 1))
        out.update({"tokens_per_s": rate, "model_tflops_per_s": rate * per_token / 1e12})
        u = mfu(rate, per_token, self.device)
        if u is not None:
            out["mfu"] = u
        return out
