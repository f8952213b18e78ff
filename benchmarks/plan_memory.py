"""The memory planner (lumo_ray/plan.py) beside the peak torch's MemTracker measures on CPU.

    python -m benchmarks.plan_memory

For the tiny and small presets, each freeze mode, with and without activation checkpointing: one
training step as the token-LM trainer takes it (target_losses on a batch whose last `target` positions
are the target, AdamW over the trainable parameters, the new-row gradient mask), measured after a
first step so that AdamW's state exists. Prints estimate, measured peak and their ratio.
"""
from __future__ import annotations

import platform
from contextlib import contextmanager

import torch

from lumo_ray.plan import estimate, shape_of

VOCAB, TEXT_VOCAB = 2880, 512  # the tiny token space: 512 text rows of a 2,880-row vocabulary


class _NoHandle:
    def remove(self) -> None:
        pass


@contextmanager
def _frozen_params_tolerated():
    """MemTracker hooks every parameter of a module it enters to see its gradient; a frozen one (new_rows,
    lora) refuses a hook. It never gets a gradient, so no hook is needed: hand back a no-op handle."""
    T = torch.Tensor
    hook, post = T.register_hook, T.register_post_accumulate_grad_hook
    T.register_hook = lambda self, fn: hook(self, fn) if self.requires_grad else _NoHandle()
    T.register_post_accumulate_grad_hook = lambda self, fn: post(self, fn) if self.requires_grad else _NoHandle()
    try:
        yield
    finally:
        T.register_hook, T.register_post_accumulate_grad_hook = hook, post


def measure(preset: str, freeze: str, micro_batch: int, seq: int, target: int, checkpointing: bool,
            vocab: int = VOCAB, text_vocab: int = TEXT_VOCAB) -> int:
    """Peak bytes MemTracker sees on CPU during one steady-state training step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from lumo_ray.config.lm import LoraConfig
    from lumo_ray.models.base_lm import build_base_lm
    from lumo_ray.models.token_lm import apply_freeze, target_losses
    from trainers.loop import checkpoint_activations

    model = apply_freeze(build_base_lm(preset, vocab, seed=0), freeze, text_vocab, LoraConfig())
    checkpoint_activations(model, checkpointing)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (micro_batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, seq - target:] = ids[:, seq - target:]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, n = target_losses(model, batch)
        (loss.sum() / n.sum()).backward()
        opt.step()

    step()
    tracker = MemTracker()
    with _frozen_params_tolerated():
        tracker.track_external(model, opt)
        with tracker:
            step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def compare(preset: str, freeze: str, micro_batch: int, seq: int, target: int, checkpointing: bool) -> dict:
    e = estimate(shape_of(preset, VOCAB), freeze=freeze, micro_batch=micro_batch, seq=seq, target_tokens=target,
                 checkpointing=checkpointing)
    m = measure(preset, freeze, micro_batch, seq, target, checkpointing)
    return {"estimate": e.peak, "measured": m, "ratio": e.peak / m}


CASES = [(p, f, b, s, t, c) for p in ("tiny", "small") for f in ("new_rows", "lora", "full") for c in (False, True)
         for b, s, t in ((8, 256, 64), (4, 512, 256))]


def main() -> None:
    print(f"# planner vs MemTracker peak, one training step on CPU (fp32); {platform.machine()}, torch {torch.__version__}")
    print("| preset | freeze | batch x seq (target) | checkpointing | estimate MB | measured MB | estimate / measured |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for p, f, b, s, t, c in CASES:
        r = compare(p, f, b, s, t, c)
        worst = max(worst, abs(r["ratio"] - 1))
        print(f"| {p} | {f} | {b} x {s} ({t}) | {'on' if c else 'off'} | {r['estimate'] / 1e6:.1f} | {r['measured'] / 1e6:.1f} "
              f"| {r['ratio']:.2f} |")
    print(f"largest |estimate / measured - 1|: {worst:.2f} (target: <= 0.25)")


if __name__ == "__main__":
    main()
