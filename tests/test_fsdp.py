"""train.strategy fsdp (FSDP2 on CPU with gloo) for the token LM: the same losses as DDP, exact resume,
resharding between worker counts through the sharded (torch.distributed.checkpoint) checkpoint, the
export, and text invariance under new_rows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lumo_ray.codecs.text import build_text_adapter
from lumo_ray.data.sequences import SequenceBuilder
from lumo_ray.data.shard_reader import ShardDataset
from lumo_ray.eval.text_invariance import text_invariance
from lumo_ray.models.token_lm import load_causal_lm, load_token_lm
from test_token_lm_train import QUIET, make_cfg
from trainers.context import LocalContext
from trainers.token_lm import evaluate_tasks, run_token_lm, token_lm_loop

STEPS = ["token_lm.train.steps=10", "token_lm.train.ckpt_every=5", "token_lm.train.eval_every=5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    """The token-LM tests' synthetic shards (the same folder: built once per session)."""
    from pipelines.synth_shards import build_synth_shards
    from lumo_ray.uti import load_token_space

    root = tmp_path_factory.getbasetemp() / "lm_synth12_e400"
    shards, manifest, cfg = build_synth_shards(root, 12, 12, overrides=["data.normalize.eval_permille=400"], **QUIET)
    return shards, manifest, load_token_space(cfg.uti)


@pytest.fixture
def one_process_group():
    yield
    if torch.distributed.is_initialized():  # LocalContext's fsdp opened a gloo group of one: close it
        torch.distributed.destroy_process_group()


def test_prepare_shards_every_decoder_layer(one_process_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lumo_ray.models.base_lm import build_base_lm
    from trainers.fsdp import local_rows

    model = LocalContext().prepare(build_base_lm("tiny", 2880), "fsdp")
    assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    emb = model.get_input_embeddings().weight
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert local_rows(emb, 512).shape == (512, 64) and local_rows(emb.detach().full_tensor(), 512).shape == (512, 64)


@pytest.mark.parametrize("freeze", ["new_rows", "lora", "full"])
def test_fsdp_in_one_process_trains_as_plain(data, tmp_path, freeze, one_process_group):
    shards, _, ts = data
    plain = token_lm_loop(make_cfg(shards, tmp_path / "plain", f"token_lm.freeze={freeze}"), LocalContext(), ts=ts, **QUIET)
    cfg = make_cfg(shards, tmp_path / "fsdp", f"token_lm.freeze={freeze}", "token_lm.train.strategy=fsdp")
    sharded = token_lm_loop(cfg, LocalContext(), ts=ts, **QUIET)
    assert np.allclose(plain["loss_history"], sharded["loss_history"], atol=1e-5, rtol=0)
    assert abs(plain["eval_loss"] - sharded["eval_loss"]) < 1e-5
    model, _, _ = load_token_lm(tmp_path / "fsdp" / "export", expected=ts)  # the gathered export reloads
    tok = build_text_adapter(cfg.uti.text)
    b = SequenceBuilder(ts, cfg.token_lm.seq, tok.encode)
    ev = evaluate_tasks(model, b, list(ShardDataset(shards, "eval", shuffle=False, expected=ts)), LocalContext())
    assert abs(ev["all"] - sharded["eval_loss"]) < 1e-5
    if freeze == "new_rows":  # text rows masked on the local shard: the text logits are the base LM's
        base = load_causal_lm("tiny", ts.text_vocab, seed=0)
        rep = text_invariance(model, base, ts, cfg.token_lm.invariance.prompts, tok.encode)
        assert rep["pass"] and rep["max_abs_logit_diff"] == 0.0


def test_two_fsdp_workers_match_ddp_resume_exactly_and_reshard(data, tmp_path, one_process_group):
    shards, _, ts = data
    two = ["token_lm.train.num_workers=2", "token_lm.train.cpus_per_worker=0.5"]
    ddp = run_token_lm(make_cfg(shards, tmp_path / "ddp", *STEPS, *two), **QUIET)
    fsdp = run_token_lm(make_cfg(shards, tmp_path / "fsdp", *STEPS, *two, "token_lm.train.strategy=fsdp"), **QUIET)
    assert np.allclose(ddp["loss_history"], fsdp["loss_history"], atol=1e-5, rtol=0)
    assert abs(ddp["eval_loss"] - fsdp["eval_loss"]) < 1e-5
    ck = tmp_path / "fsdp" / "checkpoints" / "step-0000005"
    assert sorted(p.name for p in (ck / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # sharded checkpoint files: each rank wrote (and reported to Ray Train) its own shard; Ray merged them
    ray_ck = next(p.parent for p in (tmp_path / "fsdp" / "ray" / "token_lm").glob("checkpoint_*/state.pt")
                  if json.loads((p.parent / "meta.json").read_text())["step"] == 5)  # (not Ray's checkpoint_manager_snapshot.json)
    assert sorted(p.name for p in (ray_ck / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "trainable" not in torch.load(ray_ck / "state.pt", weights_only=True)  # no gathered weights
    again = run_token_lm(make_cfg(shards, tmp_path / "again", *STEPS, *two, "token_lm.train.strategy=fsdp",
                                  f"token_lm.train.resume={ray_ck}"), **QUIET)
    assert np.allclose(again["loss_history"], fsdp["loss_history"][5:], atol=1e-6, rtol=0)  # exact resume
    # 2 -> 1: the two shards load into one process's shard and train on
    one = token_lm_loop(make_cfg(shards, tmp_path / "one", *STEPS, "token_lm.train.strategy=fsdp",
                                 f"token_lm.train.resume={ck}"), LocalContext(), ts=ts, **QUIET)
    assert one["steps"] == 10 and len(one["loss_history"]) == 5 and np.isfinite(one["eval_loss"])
    # 1 -> 2: a one-process checkpoint resumes on two workers
    ck1 = tmp_path / "one" / "checkpoints" / "step-0000010"
    two_again = run_token_lm(make_cfg(shards, tmp_path / "two", "token_lm.train.steps=12", "token_lm.train.eval_every=12",
                                      "token_lm.train.ckpt_every=12", *two, "token_lm.train.strategy=fsdp",
                                      f"token_lm.train.resume={ck1}"), **QUIET)
    assert two_again["steps"] == 12 and len(two_again["loss_history"]) == 2
    with pytest.raises(ValueError, match="written with token_lm.train.strategy fsdp"):  # a ddp run refuses it, naming why
        token_lm_loop(make_cfg(shards, tmp_path / "ddp1", *STEPS, f"token_lm.train.resume={ck}"), LocalContext(),
                      ts=ts, **QUIET)


# 4 steps, a checkpoint at 2: DDP = FSDP step for step and the 2 -> 1 resume are checked as at 10 steps (the
# base LM's steps are what this test spends its time on, unlike the Ray Train starts of the others here)
LM = ["lm.train.steps=4", "lm.train.eval_every=2", "lm.train.ckpt_every=2", "lm.train.log_every=1000", "lm.seq_len=32",
      "lm.train.global_batch=8", "lm.eval_fraction=0.2", "lm.train.cpus_per_worker=0.5"]


def train_lm(out, *extra) -> dict:
    import json

    from lumo_ray.cli import main
    from lumo_ray.codecs.text import TINY_CORPUS

    sets = [x for s in (*LM, *extra) for x in ("--set", s)]
    assert main(["train", "lm", "--input", str(TINY_CORPUS), "--out", str(out), *sets]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_base_lm_fsdp_matches_ddp_and_its_checkpoint_resumes_on_one_worker(tmp_path, ray_local, one_process_group):
    """`lumo train lm` with lm.train.strategy=fsdp on 2 workers: the DDP run's losses within 1e-5 over 4
    steps, a gathered export that transformers loads, and a checkpoint that resumes on 1 worker."""
    from transformers import AutoModelForCausalLM

    from lumo_ray.config import LumoConfig, load_config
    from trainers.lm import lm_loop

    ddp = train_lm(tmp_path / "ddp", "lm.train.num_workers=2")
    fsdp = train_lm(tmp_path / "fsdp", "lm.train.num_workers=2", "lm.train.strategy=fsdp")
    assert np.allclose(ddp["loss_history"], fsdp["loss_history"], atol=1e-5, rtol=0)
    assert abs(ddp["eval_loss"] - fsdp["eval_loss"]) < 1e-5
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ddp" / "export")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "export")).state_dict()
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    ck = tmp_path / "fsdp" / "checkpoints" / "step-0000002"
    cfg = load_config(LumoConfig, tmp_path / "fsdp" / "config.yaml",  # the run's own config, on one worker
                      ["lm.train.num_workers=1", f"lm.train.resume={ck}", f"lm.out={tmp_path / 'one'}"])
    one = lm_loop(cfg, LocalContext(), log=lambda *a, **k: None)  # 2 -> 1: the gathered state, resharded
    assert one["steps"] == 4 and len(one["loss_history"]) == 2 and np.isfinite(one["eval_loss"])
    cfg.lm.train.strategy, cfg.lm.out = "ddp", str(tmp_path / "ddp1")
    with pytest.raises(ValueError, match="written with lm.train.strategy fsdp"):
        lm_loop(cfg, LocalContext(), log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def vlm_synth(tmp_path_factory) -> str:
    from lumo_ray.data.synth import write_synth

    return write_synth(tmp_path_factory.mktemp("vsyn_fsdp"), 160, 0, seed=2)["llava_pretrain_dir"]


def test_vlm_fsdp_matches_ddp_restarts_from_its_shards_and_reshards(vlm_synth, tmp_path, ray_local, one_process_group):
    """vlm.train.strategy=fsdp on 2 Ray Train workers (the frozen LLM and vision tower sharded per layer):
    DDP's losses within 1e-5 over 10 steps and the same connector export; a worker SIGKILLed at step 7
    restarts from the sharded step-5 checkpoint Ray merged from both ranks, exactly; that checkpoint
    resumes on 1 worker; a DDP run refuses it."""
    from safetensors.torch import load_file

    from test_vlm_train import QUIET as VQUIET, losses, small_cfg
    from trainers.checkpoint import fetch_checkpoint
    from trainers.vlm import prepare_run, run_loop, train_vlm

    runs = {}
    for strat in ("ddp", "fsdp"):
        cfg = small_cfg(vlm_synth, tmp_path / strat)
        cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.strategy = 2, 0.5, strat
        if strat == "fsdp":
            cfg.train.fail_at_step, cfg.train.max_failures = 7, 1
        runs[strat] = train_vlm(cfg, log=VQUIET)
    rows = [json.loads(x) for x in (tmp_path / "fsdp" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10]  # restarted from step 5
    assert rows[5]["loss"] == pytest.approx(rows[7]["loss"], abs=1e-6) and rows[6]["loss"] == pytest.approx(rows[8]["loss"], abs=1e-6)
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert all(abs(ddp[s] - fsdp[s]) <= 1e-5 for s in range(1, 11)), (ddp, fsdp)
    a, b = (load_file(str(tmp_path / s / "export" / "model.safetensors")) for s in ("ddp", "fsdp"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert len((tmp_path / "fsdp" / "golden" / "step_000010.jsonl").read_text().splitlines()) == 4
    ck = fetch_checkpoint(runs["fsdp"]["checkpoint"])  # step 10: both ranks' shards in one folder
    assert sorted(p.name for p in (ck / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    one = small_cfg(vlm_synth, tmp_path / "one", steps=12)
    one.train.strategy, one.train.resume = "fsdp", str(ck)
    one, run = prepare_run(one, one.train.out, VQUIET)
    run_loop(one, run, LocalContext(), log=VQUIET)  # 2 -> 1
    assert sorted(losses(run)) == [11, 12]
    one.train.strategy = "ddp"
    with pytest.raises(ValueError, match="written with vlm.train.strategy fsdp"):
        run_loop(one, run, LocalContext(), log=VQUIET)
