"""Stage 4 (`lumo train mmpt`): task mix and ramp, learnable t2a targets, exact resume, token-space
refusal, export/reload, golden generations at every checkpoint, per-task losses, and the CLI on Ray
Train with 2 DDP workers."""
import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lumo_ray.cli import main
from lumo_ray.codecs.text import build_text_adapter
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.sequences import SequenceBuilder
from lumo_ray.data.shard_reader import ShardDataset
from lumo_ray.data.task_mix import draw_task, task_probs
from pipelines.synth_shards import build_synth_shards
from lumo_ray.models.token_lm import load_token_lm
from lumo_ray.token_space import TokenSpaceMismatch
from lumo_ray.uti import load_token_space
from trainers.checkpoint import load_state
from trainers.context import LocalContext
from trainers.mmpt import MMPT_DEFAULTS
from trainers.token_lm import evaluate_tasks, token_lm_loop

QUIET = dict(log=lambda *a, **k: None)
W = {"i2t": 0.2, "a2t": 0.2, "t2i": 0.3, "t2a": 0.3}


def test_task_mix_ramp_and_blend():
    assert set(task_probs(W, 0, ramp=10, blend=10)) == {"i2t", "a2t"}
    mid = task_probs(W, 14, ramp=10, blend=10)  # half way through the blend
    assert abs(mid["t2i"] / mid["i2t"] - 0.75) < 1e-9
    assert task_probs(W, 25, ramp=10, blend=10) == pytest.approx(W)
    assert task_probs(W, 10, ramp=10) == pytest.approx(W)  # no blend: all at once
    rng = np.random.default_rng(0)
    draws = [draw_task(task_probs(W, 100), rng) for _ in range(4000)]
    assert abs(draws.count("t2a") / 4000 - 0.3) < 0.03
    with pytest.raises(ValueError, match="tasks are"):
        task_probs({"x2y": 1.0}, 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    root = Path(os.environ.get("LUMO_LM_TEST_DATA") or tmp_path_factory.getbasetemp() / "lm_synth12_e400")
    shards, manifest, cfg = build_synth_shards(root, 12, 12, overrides=["data.normalize.eval_permille=400"], **QUIET)
    return shards, load_token_space(cfg.uti)


def make_cfg(shards, out, *extra):
    return load_config(LumoConfig, None, [
        f"token_lm.shards={shards}", f"token_lm.out={out}", "token_lm.train.steps=6", "token_lm.train.global_batch=4",
        "token_lm.train.warmup_steps=2", "token_lm.train.eval_every=3", "token_lm.train.ckpt_every=3",
        "token_lm.seq.instruction=templates", "token_lm.mmpt.ramp_steps=2", "token_lm.mmpt.blend_steps=2",
        "token_lm.mmpt.golden_n=2", *extra], defaults=MMPT_DEFAULTS)


@pytest.fixture(scope="module")
def stage33(data, tmp_path_factory):
    """A short stage-3.3 run (new rows, own layouts) that stage 4 starts from."""
    shards, ts = data
    out = tmp_path_factory.mktemp("s33")
    cfg = load_config(LumoConfig, None, [f"token_lm.shards={shards}", f"token_lm.out={out}", "token_lm.train.steps=3",
                                         "token_lm.train.global_batch=4", "token_lm.seq.instruction=templates"])
    token_lm_loop(cfg, LocalContext(), ts=ts, **QUIET)
    return out


@pytest.fixture(scope="module")
def straight(data, stage33, tmp_path_factory):
    shards, ts = data
    out = tmp_path_factory.mktemp("mmpt")
    cfg = make_cfg(shards, out, f"token_lm.mmpt.init={stage33}")
    return cfg, token_lm_loop(cfg, LocalContext(), ts=ts, **QUIET), out


def test_defaults_sit_under_the_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("token_lm:\n  freeze: new_rows\n")
    assert load_config(LumoConfig, None, [], defaults=MMPT_DEFAULTS).token_lm.freeze == "lora"
    cfg = load_config(LumoConfig, f, ["token_lm.mmpt.task_weights.t2a=0.5"], defaults=MMPT_DEFAULTS)
    assert cfg.token_lm.freeze == "new_rows" and cfg.token_lm.seq.layouts == "any"
    assert cfg.token_lm.mmpt.task_weights.t2a == 0.5 and cfg.token_lm.mmpt.task_weights.i2t == 0.25


def test_t2a_target_is_the_centred_crop_never_a_random_window(data):
    shards, ts = data
    cfg = load_config(LumoConfig, None, ["token_lm.seq.max_audio_tokens=60"])
    b = SequenceBuilder(ts, cfg.token_lm.seq)
    s = next(x for x in ShardDataset(shards, "train", shuffle=False, expected=ts) if "audio" in x)
    spans = [b.build(s, task="t2a", rng=np.random.default_rng(k)).labels for k in range(5)]
    assert all(np.array_equal(spans[0], x) for x in spans) and np.array_equal(spans[0], b.build(s, task="t2a").labels)
    inputs = {tuple(b.build(s, task="a2t", rng=np.random.default_rng(k)).input_ids) for k in range(5)}
    assert len(inputs) > 1  # an input span is still cropped at random in training


def test_all_four_tasks_trained_and_logged_with_golden_generations(straight):
    cfg, m, out = straight
    assert set(m["eval"]) >= {"i2t", "a2t", "t2i", "t2a"} and set(m["train_tasks"]) >= {"i2t", "a2t", "t2i", "t2a"}
    assert [e["step"] for e in m["evals"]] == [3, 6] and all("eval_t2a" in e and "train_i2t" in e for e in m["evals"])
    assert set(m["eval_at_start"]) == {"eval_loss", "eval_i2t", "eval_a2t", "eval_t2i", "eval_t2a"}  # the warm start
    assert m["golden"] == ["golden/step_3", "golden/step_6"]
    g = json.loads((out / "golden" / "step_6" / "golden.json").read_text())
    tasks = {r["task"] for r in g["rows"]}
    assert tasks == {"t2i", "t2a", "i2t", "a2t"} and len(g["rows"]) == 8
    # media spans are well-formed by the constraint; a 6-step model's captions need not close (decode gate)
    assert all(r["ok"] for r in g["rows"] if r["task"] in ("t2i", "t2a")) and 0.5 <= g["compliant"] <= 1.0
    files = {Path(r["file"]).suffix for r in g["rows"]}
    assert files == {".png", ".wav", ".txt"}
    assert m["trainable"]["freeze"] == "lora"


def test_resume_is_exact(data, stage33, straight, tmp_path):
    shards, ts = data
    _, m, _ = straight
    half = make_cfg(shards, tmp_path, f"token_lm.mmpt.init={stage33}")

    def stop(step, model):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        token_lm_loop(half, LocalContext(), hook=stop, ts=ts, **QUIET)
    st = load_state(tmp_path / "checkpoints" / "step-0000003")
    assert set(st["data"]["streams"]) == {"image", "audio"}
    resumed = copy.deepcopy(half)
    resumed.token_lm.train.resume = "auto"
    r = token_lm_loop(resumed, LocalContext(), ts=ts, **QUIET)
    assert len(r["loss_history"]) == 3
    for a, b in zip(m["loss_history"][3:], r["loss_history"]):
        assert abs(a - b) <= 1e-6
    assert abs(m["eval_loss"] - r["eval_loss"]) <= 1e-6


def test_foreign_token_space_is_refused(data, stage33, tmp_path):
    shards, ts = data
    other = make_cfg(shards, tmp_path, f"token_lm.mmpt.init={stage33}", "uti.token_space.special_slots=65")
    with pytest.raises(TokenSpaceMismatch) as e:  # the stage-3.3 run it starts from has another token space
        token_lm_loop(other, LocalContext(), **QUIET)
    assert ts.hash in str(e.value) and "ranges[1].size" in str(e.value)


def test_export_reloads_to_the_same_loss(data, straight):
    shards, ts = data
    cfg, m, out = straight
    model, _, meta = load_token_lm(out / "export", expected=ts)  # LoRA merged into the weights
    assert meta["freeze"] == "lora"
    b = SequenceBuilder(ts, cfg.token_lm.seq, build_text_adapter(cfg.uti.text).encode)
    ev = evaluate_tasks(model, b, list(ShardDataset(shards, "eval", shuffle=False, expected=ts)), LocalContext())
    assert abs(ev["all"] - m["eval_loss"]) < 1e-4 and set(ev) >= {"t2i", "t2a"}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cli_trains_on_ray_with_two_workers(data, stage33, tmp_path, strategy):
    """Stage 4 on 2 Ray Train workers with golden generations at the checkpoint; under fsdp every rank
    generates them in lockstep (each forward gathers the sharded layers) and rank 0 writes them."""
    shards, _ = data
    out = tmp_path / "run"
    rc = main(["train", "mmpt", "--init", str(stage33), "--shards", str(shards), "--out", str(out),
               "--set", "token_lm.train.num_workers=2", "--set", "token_lm.train.steps=4",
               "--set", "token_lm.train.global_batch=4", "--set", "token_lm.train.eval_every=4",
               "--set", "token_lm.train.ckpt_every=4", "--set", "token_lm.mmpt.golden_n=1",
               "--set", f"token_lm.train.strategy={strategy}"])
    m = json.loads((out / "metrics.json").read_text())
    assert rc == 0 and m["steps"] == 4 and set(m["eval"]) >= {"i2t", "a2t", "t2i", "t2a"}
    golden = json.loads((out / "golden" / "step_4" / "golden.json").read_text())
    assert sorted(r["task"] for r in golden["rows"]) == ["a2t", "i2t", "t2a", "t2i"] and m["golden"] == ["golden/step_4"]
    assert (out / "export" / "token_space.json").exists()


def test_reference_stage4_config_loads_and_status_checks_it():
    from pipelines.status import config_asks, fit_problems, local_offer
    from trainers.mmpt import check_mmpt
    from lumo_ray.uti import build_token_space

    cfg = load_config(LumoConfig, Path(__file__).resolve().parents[1] / "configs" / "reference" / "stage4_mmpt.yaml",
                      defaults=MMPT_DEFAULTS)
    check_mmpt(cfg)
    c = cfg.token_lm
    assert c.base == "Qwen/Qwen3-8B-Base" and c.freeze == "lora" and c.lora.r == 8 and len(c.lora.target_modules) == 7
    assert (c.train.steps, c.train.lr, c.new_row_lr) == (2000, 5e-5, 5e-4)
    assert build_token_space(cfg.uti).total == 164021  # SPEC §3 reference layout, from declared sizes
    asks = {a["what"]: a for a in config_asks(cfg)}
    assert asks["token_lm.train workers"]["count"] == 8 and asks["token_lm.train workers"]["gpus"] == 1.0
    assert any("token_lm.train workers" in p for p in fit_problems(list(asks.values()), local_offer()))


def test_two_trial_mmpt_study_writes_its_table_and_constraints(data, stage33, tmp_path):
    import csv

    from trainers.tune_mmpt import INFEASIBLE, run_mmpt_study

    shards, _ = data
    cfg = make_cfg(shards, tmp_path / "unused", f"token_lm.mmpt.init={stage33}", "token_lm.mmpt.study.num_samples=2",
                   "token_lm.mmpt.study.steps=4", "token_lm.mmpt.study.report_every=2", "token_lm.mmpt.study.n=4",
                   "token_lm.ablation.n=4", f"token_lm.mmpt.study.out={tmp_path / 'study'}")
    res = run_mmpt_study(cfg, log=lambda *a: None)
    rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
    assert len(rows) == 2 and all(r["error"] == "" for r in rows)
    for r in rows:  # objective = mean per-task eval loss, + INFEASIBLE when a gate constraint fails
        mean = sum(float(r[f"eval_{t}"]) for t in ("i2t", "a2t", "t2i", "t2a")) / 4
        feasible = r["prompt_gate"] == "True" and r["modality_gate"] == "True"
        assert (r["feasible"] == "True") == feasible
        assert float(r["objective"]) == pytest.approx(mean + (0 if feasible else INFEASIBLE))
    text = (tmp_path / "study" / "results.md").read_text()
    assert "objective = mean eval loss" in text and res["pass"] == (res["best"] is not None)
    # each trial's TensorBoard events (Ray Tune's own logger), read back with TensorBoard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in rows:
        ev = EventAccumulator(r["dir"])
        ev.Reload()
        objective = ev.Scalars("ray/tune/objective")
        assert objective and objective[-1].value == pytest.approx(float(r["objective"]))
        assert not (Path(r["dir"]) / "run" / "tensorboard").exists()  # no second copy from the trainer
