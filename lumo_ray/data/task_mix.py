"""Stage-4 task mix (docs/stage4_mmpt.md): which task each training sequence trains, per step.

Tasks are drawn from normalised weights; during the ramp only x2t tasks are drawn, then the t2x
weights rise linearly over `blend` steps to their configured value. A pure function of
(weights, step, ramp, blend) and the caller's seeded generator, so a resumed run draws the same tasks.
"""
from __future__ import annotations

import numpy as np

TASKS = ("i2t", "a2t", "t2i", "t2a")
T2X = ("t2i", "t2a")
MODALITY = {"i2t": "image", "t2i": "image", "a2t": "audio", "t2a": "audio"}


def task_probs(weights: dict[str, float], step: int, ramp: int = 0, blend: int = 0) -> dict[str, float]:
    """Probability of each task at optimizer step `step` (0-based)."""
    bad = {t: w for t, w in weights.items() if t not in TASKS or w < 0 or w != w}
    if bad:
        raise ValueError(f"task weights {bad}: tasks are {list(TASKS)} with finite weights >= 0")
    if step < ramp:
        scale = 0.0
    else:
        scale = 1.0 if blend <= 0 else min(1.0, (step - ramp + 1) / blend)
    w = {t: float(weights.get(t, 0.0)) * (scale if t in T2X else 1.0) for t in TASKS}
    if sum(w.values()) <= 0:  # a t2x-only mix during its ramp: nothing to draw yet, so draw t2x
        w = {t: float(weights.get(t, 0.0)) for t in TASKS}
    tot = sum(w.values())
    if tot <= 0:
        raise ValueError("task weights are all 0: give at least one task a positive weight")
    return {t: v / tot for t, v in w.items() if v > 0}


def draw_task(probs: dict[str, float], rng: np.random.Generator) -> str:
    tasks = list(probs)
    return tasks[int(rng.choice(len(tasks), p=np.array([probs[t] for t in tasks])))]
