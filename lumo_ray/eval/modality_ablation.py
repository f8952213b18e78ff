"""The modality ablation gate (docs/gates.md) of the token LM: does the caption loss depend on the media span?

On a fixed seeded eval slice, per modality (image: i2t, audio: a2t layouts), the caption loss with
the correct media span is compared with the span shuffled (another sample's media), replaced by
random in-range ids (noise; audio keeps codebook phase) and by a constant span (const, reported).
Pass: shuffle gap >= 0.10 nats with win rate >= 0.80, noise gap >= 0.15 with win >= 0.85, each with a
one-sided sign test p < 0.01 (lumo_ray/eval/stats.py); a non-finite loss fails.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config.lm import AblationConfig, SequenceConfig
from ..data.sequences import SequenceBuilder, collate, const_like, noise_like
from ..data.mix import primary
from ..data.shard_reader import ShardDataset
from ..models.token_lm import target_losses
from ..storage import write_file
from ..token_space import TokenSpace
from .stats import MAX_P, cell, paired, passes

X2T = {"image": "i2t", "audio": "a2t"}


def ablation_slice(shards: str | Path, ts: TokenSpace, cfg: AblationConfig) -> dict[str, list[dict]]:
    """Per modality: up to cfg.n samples holding that modality, chosen by cfg.seed (order fixed)."""
    samples = list(ShardDataset(shards, cfg.split, shuffle=False, expected=ts))
    out = {}
    for m in cfg.modalities:
        have = sorted((s for s in samples if m in s), key=lambda s: s["json"]["id"])
        idx = np.random.default_rng([cfg.seed, len(m)]).permutation(len(have))[: cfg.n]
        out[m] = [have[i] for i in sorted(idx)]
    return out


def _losses(model, builder: SequenceBuilder, samples: list[dict], task: str, media: list[np.ndarray],
            batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            seqs = [builder.build(s, task=task, media_override=m)
                    for s, m in zip(samples[i: i + batch_size], media[i: i + batch_size])]
            loss, n = target_losses(model, collate(seqs, builder.pad_id))
            out += (loss / n.clamp(min=1)).tolist()
    return np.asarray(out)


def _shuffle_pairs(samples: list[dict], rng: np.random.Generator) -> list[int]:
    """A derangement that prefers a partner with a different caption (else shuffling proves nothing)."""
    n = len(samples)
    perm = rng.permutation(n)
    partner = [int(perm[(k + 1) % n]) for k in range(n)]
    order = {int(p): k for k, p in enumerate(perm)}
    res = [0] * n
    for i in range(n):
        k = order[i]
        cap = samples[i]["text"].tolist()
        for step in range(1, n):
            j = int(perm[(k + step) % n])
            if samples[j]["text"].tolist() != cap:
                res[i] = j
                break
        else:
            res[i] = partner[k]
    return res


def modality_ablation(model: torch.nn.Module, ts: TokenSpace, shards: str | Path, seq_cfg: SequenceConfig,
                      cfg: AblationConfig, encode=None, slice_: Optional[dict] = None) -> dict:
    """Report dict: per modality mean losses, gaps, win rates, relative gaps and pass; overall pass."""
    model.eval()
    builder = SequenceBuilder(ts, seq_cfg, encode)
    slice_ = slice_ if slice_ is not None else ablation_slice(shards, ts, cfg)
    report: dict = {"modalities": {}, "n": {}, "thresholds": {
        "shuffle": {"gap": cfg.min_shuffle_gap, "win": cfg.min_shuffle_win},
        "noise": {"gap": cfg.min_noise_gap, "win": cfg.min_noise_win}, "p": MAX_P}, "seed": cfg.seed, "split": cfg.split}
    ok = True
    for m in cfg.modalities:
        samples = slice_.get(m, [])
        report["n"][m] = len(samples)
        if len(samples) < 2:
            report["modalities"][m] = {"pass": False, "reason": f"{len(samples)} {m} samples in split {cfg.split}"}
            ok = False
            continue
        task = X2T[m]
        rng = np.random.default_rng([cfg.seed, 7, len(m)])
        correct = [builder.media(s, m, None) for s in samples]
        pairs = _shuffle_pairs(samples, rng)
        conds = {"correct": correct, "shuffle": [correct[j] for j in pairs],
                 "noise": [noise_like(ts, m, c.size, rng) for c in correct],
                 "const": [const_like(ts, m, c.size) for c in correct]}
        losses = {k: _losses(model, builder, samples, task, v, cfg.batch_size) for k, v in conds.items()}
        base = losses["correct"]
        r: dict = {"loss": {k: float(v.mean()) for k, v in losses.items()}}
        for k in ("shuffle", "noise", "const"):
            r[k] = paired(losses[k] - base, cfg.seed)
            r[k]["rel_gap"] = r[k]["gap"] / max(float(base.mean()), 1e-9)
        r["pass"] = (passes(r["shuffle"], cfg.min_shuffle_gap, cfg.min_shuffle_win)
                     and passes(r["noise"], cfg.min_noise_gap, cfg.min_noise_win))
        ok = ok and r["pass"]
        report["modalities"][m] = r
    report["pass"] = ok
    return report


def write_report(report: dict, out_dir: str | Path, title: str = "Modality ablation") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "report.json", json.dumps(report, indent=2) + "\n")
    lines = [f"# {title}: {'PASS' if report['pass'] else 'FAIL'}", "",
             f"Each cell: mean gap (nats per caption token) [bootstrap 95% CI] (win rate, one-sided sign-test p). "
             f"Pass: shuffle gap >= {report['thresholds']['shuffle']['gap']} (win >= {report['thresholds']['shuffle']['win']}), "
             f"noise gap >= {report['thresholds']['noise']['gap']} (win >= {report['thresholds']['noise']['win']}), "
             f"p < {report['thresholds'].get('p', MAX_P)} each; const is reported.", "",
             "| modality | n | correct | shuffle gap | noise gap | const gap | pass |",
             "|---|---|---|---|---|---|---|"]
    for m, r in report["modalities"].items():
        if "loss" not in r:
            lines.append(f"| {m} | {report['n'][m]} | - | - | - | - | FAIL ({r['reason']}) |")
            continue
        cells = [cell(r[k]) for k in ("shuffle", "noise", "const")]
        lines.append(f"| {m} | {report['n'][m]} | {r['loss']['correct']:.3f} | " + " | ".join(cells)
                     + f" | {'PASS' if r['pass'] else 'FAIL'} |")
    write_file(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.json"


def run_modality_ablation(run_dir: str | Path, out_dir: str | Path, cfg=None, shards: Optional[str] = None,
                          onnx: Optional[str] = None) -> dict:
    """`lumo eval modality-ablation --run DIR`: the run's export, config and shards; with `onnx`, the
    losses come from that ONNX export of the run (lumo_ray/onnx_lm.py) instead of the PyTorch model."""
    from ..codecs.text import build_text_adapter
    from ..config import LumoConfig, load_config
    from ..models.token_lm import load_token_lm
    from ..storage import fetch_run

    run = fetch_run(run_dir)  # a path, or the local cache of a URI
    cfg = cfg or load_config(LumoConfig, run / "config.yaml")
    model, ts, _ = load_token_lm(run / "export")
    if onnx:
        from ..onnx_lm import load_onnx_lm

        model = load_onnx_lm(onnx, ts)
    encode = build_text_adapter(cfg.uti.text).encode if cfg.token_lm.seq.instruction in ("fixed", "templates") else None
    rep = modality_ablation(model, ts, shards or primary(cfg.token_lm.shards), cfg.token_lm.seq, cfg.token_lm.ablation, encode)
    rep["run"] = str(run_dir) + (f" (onnxruntime: {onnx})" if onnx else "")
    write_report(rep, out_dir)
    return rep
