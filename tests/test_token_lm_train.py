"""Token-LM trainer: exact resume, token-space refusal (shards and checkpoints), export/reload, text
invariance, modality-ablation report + CLI exit status, and one Ray Train DDP run with 2 workers."""
import copy
import os
import json
from pathlib import Path

import pytest
import torch

from lumo_ray.cli import main
from lumo_ray.codecs.text import build_text_adapter
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.sequences import SequenceBuilder
from lumo_ray.data.shard_reader import ShardDataset
from pipelines.synth_shards import build_synth_shards
from lumo_ray.eval.modality_ablation import modality_ablation
from lumo_ray.eval.text_invariance import text_invariance
from lumo_ray.models.token_lm import load_causal_lm, load_token_lm
from lumo_ray.token_space import TokenSpaceMismatch
from lumo_ray.uti import load_token_space
from trainers.checkpoint import load_state
from trainers.context import LocalContext
from trainers.token_lm import evaluate_tasks, run_token_lm, token_lm_loop

QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    # LUMO_LM_TEST_DATA: a persistent folder to reuse between pytest runs while developing
    root = Path(os.environ.get("LUMO_LM_TEST_DATA") or tmp_path_factory.getbasetemp() / "lm_synth12_e400")
    shards, manifest, cfg = build_synth_shards(root, 12, 12, overrides=["data.normalize.eval_permille=400"], **QUIET)
    return shards, manifest, load_token_space(cfg.uti)


def make_cfg(shards, out, *extra):
    return load_config(LumoConfig, None, [
        f"token_lm.shards={shards}", f"token_lm.out={out}", "token_lm.train.steps=6", "token_lm.train.global_batch=4",
        "token_lm.train.warmup_steps=2", "token_lm.train.eval_every=3", "token_lm.train.ckpt_every=3",
        "token_lm.seq.max_audio_tokens=60", "token_lm.seq.instruction=templates", "token_lm.seq.layouts=both",
        *extra])


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    shards, _, ts = data
    out = tmp_path_factory.mktemp("straight")
    cfg = make_cfg(shards, out)
    m = token_lm_loop(cfg, LocalContext(), ts=ts, **QUIET)
    return cfg, m, out


def test_a_worker_builds_no_codec_it_is_handed_the_drivers_token_space(data, tmp_path, monkeypatch):
    """The Ray Train worker entry (trainers/token_lm._worker) with the config run_token_lm hands it: every
    adapter build (lumo_ray.uti.build_adapters: text, image and audio codecs) is counted, and there is none;
    the same loop without the driver's token space builds them (so the count can see one)."""
    import lumo_ray.uti as uti
    from trainers.token_lm import _worker

    shards, _, ts = data
    builds = []
    real = uti.build_adapters
    monkeypatch.setattr(uti, "build_adapters", lambda *a, **k: builds.append(1) or real(*a, **k))
    cfg = make_cfg(shards, tmp_path / "handed", "token_lm.train.steps=2", "token_lm.train.eval_every=2",
                   "token_lm.train.ckpt_every=2")
    _worker({"cfg": cfg, "ts_json": ts.to_json()}, LocalContext())
    assert builds == [] and (tmp_path / "handed" / "metrics.json").exists()
    token_lm_loop(make_cfg(shards, tmp_path / "built", "token_lm.train.steps=1"), LocalContext(), **QUIET)
    assert len(builds) == 1


def test_resume_is_exact(data, straight, tmp_path):
    shards, _, ts = data
    _, m, _ = straight
    half = make_cfg(shards, tmp_path, "token_lm.train.steps=6")
    # first half: a 6-step schedule interrupted after step 3 (its checkpoint), then resumed
    calls = []

    def stop(step, model):
        calls.append(step)
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        token_lm_loop(half, LocalContext(), hook=stop, ts=ts, **QUIET)
    assert (tmp_path / "checkpoints" / "step-0000003" / "state.pt").exists()
    resumed_cfg = copy.deepcopy(half)
    resumed_cfg.token_lm.train.resume = "auto"
    r = token_lm_loop(resumed_cfg, LocalContext(), ts=ts, **QUIET)
    first = load_state(tmp_path / "checkpoints" / "step-0000003")
    assert first["data"]["pos"] == 12 and first["token_space_hash"] == ts.hash
    assert len(r["loss_history"]) == 3
    for a, b in zip(m["loss_history"][3:], r["loss_history"]):
        assert abs(a - b) <= 1e-6
    assert abs(m["eval_loss"] - r["eval_loss"]) <= 1e-6


def test_export_reload_gives_same_loss_and_invariance_passes(data, straight):
    shards, _, ts = data
    cfg, m, out = straight
    assert m["model_tflops_per_s"] > 0 and "mfu" not in m  # throughput measured; no MFU without a known peak (CPU)
    model, ts2, meta = load_token_lm(out / "export", expected=ts)
    assert meta["freeze"] == "new_rows" and (out / "export" / "token_space.json").exists()
    tok = build_text_adapter(cfg.uti.text)
    b = SequenceBuilder(ts, cfg.token_lm.seq, tok.encode)
    ev = evaluate_tasks(model, b, list(ShardDataset(shards, "eval", shuffle=False, expected=ts)), LocalContext())
    assert abs(ev["all"] - m["eval_loss"]) < 1e-5
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert AutoModelForCausalLM.from_pretrained(str(out / "export")).config.vocab_size == ts.padded_size
    assert len(AutoTokenizer.from_pretrained(str(out / "export"))) == ts.text_vocab
    base = load_causal_lm("tiny", ts.text_vocab, seed=0)
    rep = text_invariance(model, base, ts, cfg.token_lm.invariance.prompts, tok.encode)
    assert rep["pass"] and rep["max_abs_logit_diff"] == 0.0 and rep["changed_frozen_params"] == []
    assert 0 < rep["new_row_prob_mass"]["mean"] < 1
    # CLI: exit status follows the gate
    rc = main(["eval", "text-invariance", "--run", str(out), "--base", "tiny", "--out", str(out / "ti")])
    assert rc == 0 and json.loads((out / "ti" / "report.json").read_text())["pass"]


def test_full_mode_breaks_invariance(data, tmp_path):
    shards, _, ts = data
    cfg = make_cfg(shards, tmp_path, "token_lm.freeze=full", "token_lm.train.steps=2")
    token_lm_loop(cfg, LocalContext(), ts=ts, **QUIET)
    model, _, meta = load_token_lm(tmp_path / "export")
    rep = text_invariance(model, load_causal_lm("tiny", ts.text_vocab, 0), ts, ["a red circle"],
                          build_text_adapter(cfg.uti.text).encode, meta["freeze"])
    assert not rep["pass"] and rep["changed_frozen_params"] and rep["max_abs_logit_diff"] > 0


def test_other_token_space_refused_for_shards_and_checkpoints(data, straight, tmp_path):
    shards, _, ts = data
    cfg, _, out = straight
    other = make_cfg(shards, tmp_path, "uti.token_space.special_slots=65")
    other_ts = load_token_space(other.uti)
    with pytest.raises(TokenSpaceMismatch) as e:
        run_token_lm(other, **QUIET)
    assert ts.hash in str(e.value) and other_ts.hash in str(e.value) and "first differing field: ranges[1].size" in str(e.value)
    # a checkpoint of this run loaded into a run with another token space (shards checked separately)
    ck = out / "checkpoints" / "step-0000006"
    other.token_lm.train.resume = str(ck)
    from trainers.token_lm import load_checkpoint
    with pytest.raises(TokenSpaceMismatch) as e2:
        load_checkpoint(ck, other_ts)
    assert ts.hash in str(e2.value) and other_ts.hash in str(e2.value)


def test_untrained_rows_fail_modality_ablation_report_and_cli(data, straight):
    """6 steps from a random-init base: the new rows have not learned to read media, so the gate fails
    for both modalities and the CLI exits 1 (the demo's trained 3.3 run is the passing side,
    docs/stage3_token_lm.md)."""
    shards, _, ts = data
    cfg, _, out = straight
    model, _, _ = load_token_lm(out / "export")
    rep = modality_ablation(model, ts, shards, cfg.token_lm.seq, cfg.token_lm.ablation,
                            build_text_adapter(cfg.uti.text).encode)
    assert not rep["pass"]
    for m in ("image", "audio"):
        r = rep["modalities"][m]
        assert rep["n"][m] >= 2 and set(r) >= {"loss", "shuffle", "noise", "const", "pass"} and not r["pass"]
        assert set(r["shuffle"]) >= {"n", "gap", "ci95", "win", "p"} and r["shuffle"]["n"] == rep["n"][m]
        assert abs(r["shuffle"]["gap"]) < 0.10, r["shuffle"]
    again = modality_ablation(model, ts, shards, cfg.token_lm.seq, cfg.token_lm.ablation,
                              build_text_adapter(cfg.uti.text).encode)
    assert again == rep  # fixed seeded slice
    rc = main(["eval", "modality-ablation", "--run", str(out), "--out", str(out / "abl")])
    md = (out / "abl" / "report.md").read_text()
    assert rc == 1 and "95% CI" in md and "p=" in md and "FAIL" in md


def test_ray_train_ddp_two_workers(data, tmp_path):
    shards, _, ts = data
    cfg = make_cfg(shards, tmp_path / "run", "token_lm.train.num_workers=2", "token_lm.train.cpus_per_worker=0.5",
                   "token_lm.train.steps=2", "token_lm.train.eval_every=2", "token_lm.train.ckpt_every=2")
    m = run_token_lm(cfg, **QUIET)
    assert m["steps"] == 2 and m["token_space_hash"] == ts.hash and set(m["eval"]) >= {"i2t", "a2t"}
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "token_space.json").exists()
    # rank 0's TensorBoard events: the warm start's eval at step 0, then each reported step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ev.Reload()
    evals = ev.Scalars("eval_loss")
    assert [e.step for e in evals] == [0, 2] and evals[-1].value == pytest.approx(m["eval_loss"])


def test_demo_lm_config_is_the_users_config_plus_the_demo_budget_then_set(data, tmp_path):
    """`lumo demo --config F --set K=V`: the lm stage builds its config from F, the demo's training
    budget (DEMO_TRAINING) on top, and the --set items last."""
    from lumo_ray.config.recipes import DEMO_TRAINING
    shards, _, _ = data
    root = shards.parent  # the finished build is reused: only the config is made
    f = tmp_path / "user.yaml"
    f.write_text("token_lm:\n  seq:\n    layouts: both\n  new_row_lr: 0.05\n")
    _, _, cfg = build_synth_shards(root, 12, 12, config=f, overrides=["data.normalize.eval_permille=400",
                                                                       "token_lm.train.steps=7"], **QUIET)
    assert cfg.token_lm.seq.layouts == "both"  # from the file
    assert "token_lm.new_row_lr=0.003" in DEMO_TRAINING and cfg.token_lm.new_row_lr == 0.003  # demo budget
    assert cfg.lm.train.steps == 400 and cfg.token_lm.train.steps == 7  # demo budget, then --set


@pytest.mark.parametrize("freeze", ["new_rows", "lora"])
def test_activation_checkpointing_gives_the_same_losses(data, tmp_path, freeze):
    """train.activation_checkpointing recomputes each layer in the backward pass: the same losses (to
    float rounding) as the straight run, for the frozen-rows and the LoRA modes."""
    shards, _, ts = data
    runs, saved = {}, {}
    for ac in (False, True):
        cfg = make_cfg(shards, tmp_path / str(ac), "token_lm.train.steps=4", f"token_lm.freeze={freeze}",
                       f"token_lm.train.activation_checkpointing={ac}")
        n = [0]

        def pack(t, n=n):  # every tensor autograd keeps for the backward pass
            n[0] += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            runs[ac] = token_lm_loop(cfg, LocalContext(), ts=ts, eval_start=False, **QUIET)
        saved[ac] = n[0]
    # the decoder layers' activations were not kept (measured 0.59-0.63 of the straight run: the head and
    # embeddings of the tiny model keep theirs): checkpointing is on
    assert saved[True] < 0.75 * saved[False], saved
    assert len(runs[True]["loss_history"]) == 4
    for a, b in zip(runs[False]["loss_history"], runs[True]["loss_history"]):
        assert abs(a - b) <= 1e-5, (a, b)
    assert abs(runs[False]["eval_loss"] - runs[True]["eval_loss"]) <= 1e-5


def test_a_shard_with_a_flipped_byte_stops_training_naming_it(data, tmp_path, capsys):
    """`lumo train token-lm` on shards whose bytes changed after tokenize (one flipped byte inside a
    token payload): exit 2 and one line naming the shard, instead of training on it."""
    import shutil
    import tarfile

    from lumo_ray.data.shards import load_index

    shards, _, _ = data
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    entry = next(s for s in load_index(bad)["shards"] if s["split"] == "train")
    tar = bad / entry["name"]
    with tarfile.open(tar) as t:
        m = next(m for m in t.getmembers() if m.name.endswith(".text.npy"))
    b = bytearray(tar.read_bytes())
    b[m.offset_data + m.size - 1] ^= 0x01
    tar.write_bytes(bytes(b))
    capsys.readouterr()
    rc = main(["train", "token-lm", "--shards", str(bad), "--out", str(tmp_path / "run"), "--set",
               "token_lm.train.steps=2", "--set", "token_lm.train.global_batch=4", "--set",
               "token_lm.seq.max_audio_tokens=60", "--set", "token_lm.train.cpus_per_worker=0.5"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"shard ({tar})" in err and "does not match index.json" in err, err
