"""VLM evaluation: token-weighted caption loss (per bucket), golden caption dumps, and the
visual-token ablation gate (docs/gates.md): correct vs shuffled image vs zeroed visual tokens vs
Gaussian noise matched to the projected embeddings' mean/std, teacher-forced. The gate is the
order, correct < shuffled < zeroed and correct < noise, each comparison paired per sample with a
positive mean gap, win rate >= min_win_rate and a one-sided sign test p < 0.01 (eval/stats.py), on
a held-out set of at least MIN_N samples (fewer is an error unless allow_small_n, which marks the
report as not gating: it then never passes).

Distributed-aware without Ray: when torch.distributed is initialised, eval samples are sharded
over ranks and the (loss sum, token count) pairs are all-reduced, so the result is the same loss
over the full eval set whatever the world size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..data.vlm_data import ImageStore, VLMSample, collate, to_device
from ..storage import write_file
from .stats import MAX_P, paired, passes

MIN_N = 64  # the gate: a fixed held-out set of 64-256
# the gated comparisons: (name, worse condition, better condition)
ORDER = (("shuffled", "shuffled", "correct"), ("zero", "zero", "correct"), ("noise", "noise", "correct"),
         ("zero_vs_shuffled", "zero", "shuffled"))


def _dist() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def eval_loss(model, samples: Sequence[VLMSample], images: ImageStore, batch_size: int, n_buckets: int,
              device: torch.device = torch.device("cpu"), autocast: bool = False) -> dict:
    """{"loss": sum token CE / label tokens over all samples, "tokens", "samples",
    "buckets": {b: {"loss", "tokens", "samples"}}}."""
    rank, world = _dist()
    was = model.training
    model.eval()
    acc = torch.zeros(n_buckets, 3, dtype=torch.float64)  # loss sum, tokens, samples per bucket
    mine = list(samples)[rank::world]
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        batch = to_device(collate(chunk, images, model.tokens.pad), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss_sum, n_tok = model.token_losses(batch)
        for s, ls, nt in zip(chunk, loss_sum.double().cpu(), n_tok.cpu()):
            acc[s.bucket] += torch.tensor([float(ls), float(nt), 1.0], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist
        acc_d = acc.to(device)
        dist.all_reduce(acc_d)
        acc = acc_d.cpu()
    model.train(was)
    tot = acc.sum(0)
    buckets = {str(b): {"loss": float(acc[b, 0] / acc[b, 1]) if acc[b, 1] else None,
                        "tokens": int(acc[b, 1]), "samples": int(acc[b, 2])} for b in range(n_buckets)}
    return {"loss": float(tot[0] / tot[1]) if tot[1] else float("nan"), "tokens": int(tot[1]),
            "samples": int(tot[2]), "buckets": buckets}


@torch.no_grad()
def golden_captions(model, samples: Sequence[VLMSample], images: ImageStore, text, max_new_tokens: int = 32,
                    batch_size: int = 16, device: torch.device = torch.device("cpu")) -> list[dict]:
    """Greedy captions (batched, left-padded prompts) next to the references."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i:i + batch_size])
        batch = to_device(collate(chunk, images, model.tokens.pad, left_pad=True, prompt_only=True), device)
        for s, ids in zip(chunk, model.generate(batch, max_new_tokens)):
            out.append({"id": s.id, "reference": s.caption, "generated": text.decode(ids).strip(),
                        "generated_ids": ids})
    model.train(was)
    return out


# ------------------------------------------------------------------------------------------------
# Ablation gate
# ------------------------------------------------------------------------------------------------

MODES = ("correct", "shuffled", "zero", "noise")


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point: every sample gets another sample's image."""
    if n < 2:
        raise ValueError("the shuffled-image ablation needs at least 2 samples")
    perm = rng.permutation(n)
    return np.roll(perm, 1)[np.argsort(perm)]  # i -> the sample after i in a random cycle


@torch.no_grad()
def run_ablation(model, samples: Sequence[VLMSample], images: ImageStore, n: int = 128, seed: int = 0,
                 batch_size: int = 32, min_win_rate: float = 0.5, allow_small_n: bool = False,
                 device: torch.device = torch.device("cpu")) -> dict:
    """Per-sample mean caption loss under the four visual conditions and the gated comparisons in
    ORDER (module docstring)."""
    model.eval()
    rng = np.random.default_rng([seed, 3])
    pool = sorted(samples, key=lambda s: s.id)
    pick = sorted(rng.permutation(len(pool))[: min(n, len(pool))].tolist())
    chosen = [pool[i] for i in pick]
    if len(chosen) < MIN_N and not allow_small_n:
        raise ValueError(f"VLM ablation: {len(chosen)} held-out samples (n={n}, {len(pool)} in eval) < {MIN_N}, "
                         f"the gate's minimum; use more eval data or --allow-small-n (the report then does not gate)")
    if any(len(s.image_paths) == 0 for s in chosen):
        raise ValueError("ablation samples must have images")
    shuf = _derangement(len(chosen), rng)
    shuffled_paths = [chosen[j].image_paths for j in shuf]
    # noise statistics: mean/std of the projected embeddings over the whole ablation set
    vis_all = [model.encode_images(collate(chosen[i:i + batch_size], images, model.tokens.pad)["pixel_values"]
                                   .to(device)) for i in range(0, len(chosen), batch_size)]
    flat = torch.cat([v.flatten().float() for v in vis_all])
    mu, sd = float(flat.mean()), float(flat.std())
    gen = torch.Generator().manual_seed(seed)
    losses = {m: [] for m in MODES}
    for bi, i in enumerate(range(0, len(chosen), batch_size)):
        chunk = chosen[i:i + batch_size]
        batch = to_device(collate(chunk, images, model.tokens.pad), device)
        vis = vis_all[bi]
        sb = to_device(collate(chunk, images, model.tokens.pad,
                               override_images=shuffled_paths[i:i + batch_size]), device)
        variants = {"correct": vis, "shuffled": model.encode_images(sb["pixel_values"]),
                    "zero": torch.zeros_like(vis),
                    "noise": (torch.randn(vis.shape, generator=gen) * sd + mu).to(vis)}
        for m, v in variants.items():
            ls, nt = model.token_losses(batch, visual=v)
            losses[m] += (ls / nt.clamp(min=1)).tolist()
    arr = {m: np.array(v) for m, v in losses.items()}
    mean = {m: float(a.mean()) for m, a in arr.items()}
    deltas = {m: mean[m] - mean["correct"] for m in MODES[1:]}
    wins = {m: float((arr["correct"] < arr[m]).mean()) for m in MODES[1:]}
    stats = {name: paired(arr[worse] - arr[better], seed) for name, worse, better in ORDER}
    checks = {name: passes(st, None, min_win_rate) and st["gap"] > 0 for name, st in stats.items()}
    gating = len(chosen) >= MIN_N
    return {"n": len(chosen), "seed": seed, "mean_loss": mean, "delta": deltas, "win_rate": wins,
            "min_win_rate": min_win_rate, "max_p": MAX_P, "min_n": MIN_N, "gating": gating, "stats": stats,
            "checks": checks, "noise_stats": {"mean": mu, "std": sd},
            "order_shuffled_lt_zero": mean["shuffled"] < mean["zero"],
            "ids": [s.id for s in chosen], "pass": bool(gating and all(checks.values()))}


def write_ablation(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = out / "ablation.json"
    write_file(p, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return p


def ablation_table(rep: dict) -> str:
    """Mean loss per condition, then each gated comparison: n, mean gap [bootstrap 95% CI], win rate, p."""
    lines = [f"VLM ablation on {rep['n']} held-out samples (seed {rep['seed']}):",
             f"  {'mode':9s} {'loss':>8s}"]
    lines += [f"  {m:9s} {rep['mean_loss'][m]:8.4f}" for m in MODES]
    lines.append(f"  {'comparison':20s} {'gap':>8s} {'95% CI':>19s} {'win':>5s} {'p':>8s}")
    for name, st in rep.get("stats", {}).items():
        lo, hi = st["ci95"]
        lines.append(f"  {name:20s} {st['gap']:+8.4f} [{lo:+8.4f},{hi:+8.4f}] {st['win']:5.2f} {st['p']:8.1g}"
                     f"  {'ok' if rep['checks'][name] else 'FAIL'}")
    note = "" if rep.get("gating", True) else f"; NOT GATING: n < {rep.get('min_n', MIN_N)}"
    lines.append(f"  {'PASS' if rep['pass'] else 'FAIL'} (correct < shuffled < zero, correct < noise: gap > 0, "
                 f"win rate >= {rep['min_win_rate']}, p < {rep.get('max_p', MAX_P)}{note})")
    return "\n".join(lines)


def ablation_from_export(export_dir: str | Path, split_path: Optional[str | Path], n: int, seed: int,
                         data_path: Optional[str] = None, allow_small_n: bool = False) -> dict:
    """Load an exported VLM, read its eval split (the run's data/eval.arrow beside splits.json, else
    the records splits.json names) and run the gate: only the n chosen samples' images are decoded."""
    from ..data.vlm_data import SequenceBuilder
    from ..data.vlm_records import load_eval
    from ..models.vlm import load_export

    model, cfg, text = load_export(export_dir)
    if data_path:
        cfg.data.path = data_path
    builder = SequenceBuilder(text, model.tokens, model.n_visual, cfg.data)
    samples, _ = load_eval(cfg.data, builder, split_path, cfg.vision.image_size, tables=not data_path)
    return run_ablation(model, samples, ImageStore(cfg.vision.image_size), n=n, seed=seed,
                        batch_size=cfg.ablation.batch_size, min_win_rate=cfg.ablation.min_win_rate,
                        allow_small_n=allow_small_n)
