"""Stage 3.4 prompt-ablation gate: target-span loss with the true caption vs a swapped one vs none."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lumo_ray.data.sequences import collate
from lumo_ray.eval.gates import prompt_ablation
from lumo_ray.generate import load_run
from lumo_ray.models.token_lm import target_losses
from lumo_ray.runtime import torch_threads

from test_generate_decode import make_tiny_run

CAPTIONS = ["one red circle on the left", "two blue squares at the top", "three green triangles in the center",
            "four yellow circles at the bottom", "two short high beeps", "one long low beep"]


def samples_for(run, task: str) -> list[dict]:
    """Media that is a function of the caption (what a model must read the prompt for)."""
    ts, out = run.ts, []
    for i in range(12):
        c = i % len(CAPTIONS)
        text = np.asarray(run.adapters.text.encode(CAPTIONS[c]), np.int64)
        if task == "t2i":
            media = {"image": np.full(16, ts.range("IMAGE").start + 17 * c, np.int64)}
        else:
            media = {"audio": ts.audio_to_global(np.array([[40 * c] * 8, [40 * c + 1] * 8]))}
        out.append({"json": {"id": f"{task}-{i}", "task": task}, "text": text, **media})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny run's model trained briefly on caption -> media (full fine-tune, fixed seed)."""
    run = load_run(make_tiny_run(tmp_path_factory.mktemp("prompt_run")))
    samples = {t: samples_for(run, t) for t in ("t2i", "t2a")}
    model = copy.deepcopy(run.model).train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seqs = [run.builder.build(s, task=t) for t, ss in samples.items() for s in ss]
    with torch_threads(1):
        for step in range(60):
            idx = np.random.default_rng(step).permutation(len(seqs))[:8]
            loss, n = target_losses(model, collate([seqs[i] for i in idx], run.builder.pad_id))
            opt.zero_grad()
            (loss.sum() / n.sum()).backward()
            opt.step()
    return run, model.eval(), samples


def test_prompt_gate_passes_when_the_model_reads_the_prompt(trained):
    run, model, samples = trained
    with torch_threads(1):
        rep = prompt_ablation(model, run.builder, samples, seed=0)
    for t in ("t2i", "t2a"):
        r = rep["tasks"][t]
        assert r["n"] == 12 and r["same_caption_swaps"] == 0
        assert r["swapped"]["win"] >= 0.70 and r["empty"]["win"] >= 0.80, (t, r)
        assert r["swapped"]["gap"] > 0 and r["empty"]["gap"] > 0
    assert rep["pass"]


def test_prompt_gate_fails_below_thresholds_or_without_data(trained):
    run, model, samples = trained
    with torch_threads(1):
        strict = prompt_ablation(model, run.builder, samples, min_win_swapped=1.01)
        missing = prompt_ablation(model, run.builder, {"t2i": samples["t2i"]})
    assert not strict["pass"] and not strict["tasks"]["t2i"]["pass"]
    assert not missing["pass"] and missing["tasks"]["t2i"]["pass"] and "reason" in missing["tasks"]["t2a"]
    with torch_threads(1):  # the untrained model does not read its prompt
        untrained = prompt_ablation(run.model, run.builder, samples)
    assert not untrained["pass"]
