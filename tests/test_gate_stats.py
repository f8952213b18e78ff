"""The paired statistics every ablation-type gate uses (lumo_ray/eval/stats.py): a large gap on too few
samples, a chance-level win rate and a non-finite loss fail; a consistent gap on enough samples passes."""
import math

import numpy as np
import pytest

from lumo_ray.eval.stats import bootstrap_ci, p_attainable, paired, passes, sign_test_p


def test_sign_test_and_bootstrap():
    assert sign_test_p(7, 0) == pytest.approx(0.5 ** 7) and sign_test_p(0, 0) == 1.0
    assert sign_test_p(8, 2) == pytest.approx((45 + 10 + 1) / 1024)
    assert sign_test_p(3, 3) == pytest.approx(42 / 64)  # as many losses as wins: no evidence
    assert not p_attainable(6, 0.01) and p_attainable(7, 0.01)  # 6 samples can never reach p < 0.01
    d = np.random.default_rng(0).normal(0.3, 0.1, 64)
    lo, hi = bootstrap_ci(d, seed=0)
    assert lo < d.mean() < hi and bootstrap_ci(d, seed=0) == [lo, hi]  # seeded: same CI twice


def test_consistent_gap_on_enough_samples_passes():
    d = np.random.default_rng(1).normal(0.3, 0.1, 64)
    s = paired(d)
    assert s["n"] == 64 and s["win"] > 0.95 and s["p"] < 1e-12
    assert passes(s, min_gap=0.10, min_win=0.80)
    assert not passes(s, min_gap=0.50, min_win=0.80)  # the SPEC threshold still applies


def test_two_samples_cannot_pass_however_large_the_gap():
    s = paired([5.0, 5.0])
    assert s["gap"] == 5.0 and s["win"] == 1.0 and s["p"] == 0.25
    assert not passes(s, min_gap=0.10, min_win=0.80)


def test_chance_level_wins_fail_on_p():
    d = np.array([0.2, -0.1] * 32)  # mean gap +0.05 > 0, win rate 0.5
    s = paired(d)
    assert s["gap"] > 0 and s["win"] == 0.5 and s["p"] > 0.5
    assert not passes(s, min_gap=0.0, min_win=0.5)


def test_non_finite_loss_fails_and_is_not_dropped():
    d = np.full(64, 0.3)
    d[7] = np.nan
    s = paired(d)
    assert s["n"] == 64 and math.isnan(s["gap"]) and math.isnan(s["p"])
    assert not passes(s, min_gap=0.10, min_win=0.80)
    d[7] = np.inf
    assert not passes(paired(d), min_gap=0.10, min_win=0.80)
