"""Token-LM training throughput, MFU and peak memory beside the planner's estimate.

    python -m benchmarks.train_throughput [--preset qwen3-0.6b] [--vocab 164032] [--freeze full]
        [--micro-batch 4] [--seq 2048] [--steps 20] [--device cuda] [--checkpointing]

A random-initialised Qwen3 preset on random ids (the cost of a step does not depend on the data), the
token-LM trainer's loss (`target_losses`, every position a target), AdamW, bf16 autocast on CUDA; the
first 3 steps are warm-up. Prints tokens/s, model TFLOP/s and MFU (lumo_ray/flops.py; CUDA only), the
peak memory (torch.cuda.max_memory_allocated; on CPU not measured here, see benchmarks.plan_memory)
and `lumo plan`'s estimate for the same step. benchmarks/gpu_check.sh runs it on a GPU machine.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--vocab", type=int, default=164_032, help="vocabulary rows (default: the reference program's)")
    ap.add_argument("--text-vocab", type=int, default=151_669, help="rows frozen under new_rows / lora")
    ap.add_argument("--freeze", default="full", choices=["new_rows", "lora", "full"])
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()

    from lumo_ray.config.lm import LoraConfig
    from lumo_ray.flops import device_peak_flops, flops_per_token
    from lumo_ray.models.base_lm import build_base_lm
    from lumo_ray.models.token_lm import apply_freeze, target_losses
    from lumo_ray.plan import estimate, shape_of
    from trainers.loop import checkpoint_activations

    dev = torch.device(a.device)
    model = apply_freeze(build_base_lm(a.preset, a.vocab, seed=0), a.freeze, a.text_vocab, LoraConfig()).to(dev)
    checkpoint_activations(model, a.checkpointing)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.micro_batch, a.seq), generator=g).to(dev)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    autocast = dev.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, n = target_losses(model, batch, autocast)
        (loss.sum() / n.sum()).backward()
        opt.step()

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tps = a.steps * a.micro_batch * a.seq / secs
    per_token = flops_per_token(model, a.seq, 1.0)
    peak = device_peak_flops(dev)
    est = estimate(shape_of(a.preset, a.vocab), freeze=a.freeze, micro_batch=a.micro_batch, seq=a.seq,
                   checkpointing=a.checkpointing, act_bytes=2 if autocast else 4)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# token-LM step: {a.preset}, vocab {a.vocab:,}, freeze {a.freeze}, {a.micro_batch} x {a.seq} tokens, "
          f"checkpointing {'on' if a.checkpointing else 'off'}, {name}, torch {torch.__version__}")
    print(f"tokens/s {tps:,.0f}; model TFLOP/s {tps * per_token / 1e12:.1f}; "
          + (f"MFU {tps * per_token / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else "MFU: no peak known for this device"))
    if dev.type == "cuda":
        got = torch.cuda.max_memory_allocated(dev)
        print(f"peak memory {got / 1e9:.2f} GB; lumo plan estimate {est.peak / 1e9:.2f} GB ({est.peak / got:.2f}x)")
    else:
        print(f"lumo plan estimate {est.peak / 1e9:.3f} GB (CPU peak: python -m benchmarks.plan_memory)")


if __name__ == "__main__":
    main()
