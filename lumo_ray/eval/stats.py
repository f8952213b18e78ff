"""Paired statistics shared by the ablation-type gates (docs/gates.md: VLM, modality, prompt, fidelity).

Every comparison is over per-sample paired differences d = ablated - correct (a positive d is a win
for the correct input). It reports n, the mean gap with a seeded bootstrap 95% CI, the win rate and
a one-sided exact sign test's p-value; it passes only when the gap and win rate meet the gate's
thresholds AND p < MAX_P. A non-finite difference is never dropped: the gap becomes NaN and fails.
"""
from __future__ import annotations

import math

import numpy as np

MAX_P = 0.01
BOOTSTRAP = 1000


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2); ties dropped."""
    n = wins + losses
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n)


def bootstrap_ci(d: np.ndarray, seed: int) -> list[float]:
    """Seeded percentile bootstrap 95% CI of the mean of d (NaN when d is empty or non-finite)."""
    d = np.asarray(d, float)
    if d.size == 0 or not np.isfinite(d).all():
        return [float("nan"), float("nan")]
    rng = np.random.default_rng([seed, 23])
    means = d[rng.integers(0, d.size, (BOOTSTRAP, d.size))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def p_attainable(n: int, max_p: float = MAX_P) -> bool:
    """Whether n paired samples can reach p < max_p at all (all n discordant wins: p = 0.5^n)."""
    return 0.5 ** n < max_p


def paired(d, seed: int = 0) -> dict:
    """{n, gap, ci95, win, wins, losses, p} of paired differences d (ablated - correct)."""
    d = np.asarray(d, float)
    finite = bool(np.isfinite(d).all())
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n = int(d.size)
    return {"n": n, "gap": float(d.mean()) if n and finite else float("nan"), "ci95": bootstrap_ci(d, seed),
            "win": wins / n if n and finite else float("nan"), "wins": wins, "losses": losses,
            "p": sign_test_p(wins, losses) if finite else float("nan")}


def passes(s: dict, min_gap: float | None = None, min_win: float | None = None, max_p: float = MAX_P) -> bool:
    """The gate's thresholds (None = not thresholded) and p < max_p; NaN anywhere fails."""
    ok = s["n"] > 0 and math.isfinite(s["gap"]) and math.isfinite(s["p"]) and s["p"] < max_p
    if min_gap is not None:
        ok = ok and s["gap"] >= min_gap
    if min_win is not None:
        ok = ok and s["win"] >= min_win
    return bool(ok)


def cell(s: dict) -> str:
    """A report-table cell: gap [95% CI] (win, p)."""
    lo, hi = s["ci95"]
    return f"{s['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({s['win']:.2f}, p={s['p']:.1g})"
