"""The per-attribute accuracy gate of generation fidelity (docs/gates.md), shared by the attribute probe on generated
media (eval/fidelity.py, t2i / t2a) and the caption parser on generated captions (eval/captions.py, i2t /
a2t): per sample, was the attribute read right from the output made for this sample (generated) and when
scored against another sample (swapped, the floor)? Chance is the majority-class rate of the labels. The
gate: ceiling >= probe_min, generated >= chance + fraction x (ceiling - chance), generated > swapped, and
the paired one-sided exact sign test (eval/stats.py) at p < max_p."""
from __future__ import annotations

import math

import numpy as np

from ..config.lm import FidelityConfig
from .stats import bootstrap_ci, p_attainable, sign_test_p


def chance(labels: list) -> float:
    """The majority-class rate of labels (always guessing the most frequent value; never below 1/k)."""
    if not labels:
        return float("nan")
    _, counts = np.unique(np.array([str(v) for v in labels]), return_counts=True)
    return float(counts.max() / len(labels))


def attribute_row(truth: list, generated: np.ndarray, swapped: np.ndarray, ceiling: float, gated: bool,
                  cfg: FidelityConfig) -> dict:
    """One attribute's columns from per-sample hits (read right or not) of the generated and the swapped
    outputs against `truth`: chance, ceiling, accuracies and the paired comparison (the gate's inputs)."""
    n = len(truth)
    g, s = np.asarray(generated, bool), np.asarray(swapped, bool)
    wins, losses = int((g & ~s).sum()), int((~g & s).sum())
    d = g.astype(float) - s.astype(float)
    return {"chance": chance(truth), "ceiling": ceiling, "generated": float(g.mean()) if n else float("nan"),
            "swapped": float(s.mean()) if n else float("nan"), "gated": gated,
            "paired": {"gap": float(d.mean()) if n else float("nan"), "ci95": bootstrap_ci(d, cfg.seed),
                       "win_rate": wins / n if n else float("nan"), "wins": wins, "losses": losses,
                       "p": sign_test_p(wins, losses)}}


def gate(r: dict, n: int, cfg: FidelityConfig) -> dict:
    """The verdict on an attribute_row: ceiling readable, generated >= chance + fraction x (ceiling - chance),
    above swapped, sign-test p < max_p."""
    vals = [r["chance"], r["ceiling"], r["generated"], r["swapped"], r["paired"]["p"]]
    target = r["chance"] + cfg.fraction * (r["ceiling"] - r["chance"])
    checks = {"finite": all(math.isfinite(v) for v in vals),
              "probe_reads": r["ceiling"] >= cfg.probe_min,
              "above_target": r["generated"] >= target,
              "above_swapped": r["generated"] > r["swapped"],
              "significant": r["paired"]["p"] < cfg.max_p}
    reasons = []
    if not checks["finite"]:
        reasons.append("non-finite value")
    if not checks["probe_reads"]:
        reasons.append(f"the probe cannot read it (real eval accuracy {r['ceiling']:.2f} < {cfg.probe_min:.2f})")
    else:
        if not checks["above_target"]:
            reasons.append(f"generated {r['generated']:.2f} < target {target:.2f}")
        if not checks["above_swapped"]:
            reasons.append(f"generated {r['generated']:.2f} <= swapped {r['swapped']:.2f}")
        if not checks["significant"]:
            reasons.append(f"sign test p {r['paired']['p']:.3g} >= {cfg.max_p}"
                           + ("" if p_attainable(n, cfg.max_p) else f" (n = {n} cannot reach it)"))
    return {"target": target, "checks": checks, "pass": all(checks.values()),
            "reason": "; ".join(reasons)}
