"""Token-LM dataset mixing (lumo_ray.data.mix): the drawn proportions follow the weights, a sampler
restored from its state continues the exact sequence, a mixed training run records the mix it saw and
resumes exactly, and shard sets of different token spaces are refused before training (exit 2)."""
import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lumo_ray.cli import main
from pipelines.synth_shards import build_synth_shards
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data import mix
from lumo_ray.data.shard_reader import ShardDataset
from lumo_ray.uti import load_token_space
from trainers.checkpoint import load_state
from trainers.context import LocalContext
from trainers.token_lm import token_lm_loop

QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, ray_local):
    """Two real shard sets of one token space: the synthetic set under two paths (b is a copy)."""
    root = Path(os.environ.get("LUMO_LM_TEST_DATA") or tmp_path_factory.getbasetemp() / "lm_synth12_e400")
    a, _, cfg = build_synth_shards(root, 12, 12, overrides=["data.normalize.eval_permille=400"], **QUIET)
    b = tmp_path_factory.mktemp("mix") / "b"
    shutil.copytree(a, b)
    return a, b, load_token_space(cfg.uti)


def sampler(a, b, ts, state=None, weights=(0.7, 0.3), seed=0):
    ds = [ShardDataset(p, "train", seed=seed, expected=ts) for p in (a, b)]
    return mix.MixStream(ds, weights, seed, rank=0, state=state)


def test_drawn_proportions_follow_the_weights(sets):
    a, b, ts = sets
    s = sampler(a, b, ts)
    picks = [s.next()[0] for _ in range(5000)]
    share = picks.count(0) / len(picks)
    assert abs(share - 0.7) <= 0.02, share
    assert s.seen == [picks.count(0), picks.count(1)]
    # the draws are a function of the seed: another sampler draws the same sources, another seed others
    assert [sampler(a, b, ts).pick(n) for n in range(200)] == picks[:200]
    assert [sampler(a, b, ts, seed=1).pick(n) for n in range(200)] != picks[:200]


def test_sampler_resumes_the_same_sequence(sets):
    a, b, ts = sets
    straight = sampler(a, b, ts)
    seq = [straight.next() for _ in range(90)]  # > 2 epochs of both sources (17 train samples each)
    half = sampler(a, b, ts)
    for _ in range(37):
        half.next()
    state = json.loads(json.dumps(half.state()))  # what a checkpoint records: small, plain data
    assert set(state) == {"sources"} and sum(e["seen"] for e in state["sources"]) == 37
    resumed = sampler(a, b, ts, state=state)
    for want in seq[37:]:
        got = resumed.next()
        assert got[:3] == want[:3] and got[3]["json"]["id"] == want[3]["json"]["id"]


def test_one_source_keeps_the_plain_position_and_checks(sets, tmp_path):
    a, b, ts = sets
    one = mix.MixStream([ShardDataset(a, "train", expected=ts)], [1.0], 0, 0)
    one.next()
    assert one.state() == {"epoch": 0, "pos": 1, "seen": 1}  # the data position of an unmixed run
    cfg = load_config(LumoConfig, None, [f"token_lm.shards=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]"])
    assert mix.sources(cfg.token_lm.shards) == [(str(a), 0.75), (str(b), 0.25)]
    assert mix.check_sources(cfg.token_lm.shards, ts) == [str(a), str(b)]
    assert mix.modalities(str(a)) == {"image", "audio"}
    f = tmp_path / "mix.yaml"
    f.write_text(f"token_lm:\n  shards:\n    - path: {a}\n      weight: 0.7\n    - path: {b}\n      weight: 0.3\n")
    assert [s.weight for s in load_config(LumoConfig, f).token_lm.shards] == [0.7, 0.3]


def make_cfg(shards, out, *extra):
    return load_config(LumoConfig, None, [
        f"token_lm.shards={shards}", f"token_lm.out={out}", "token_lm.train.steps=4", "token_lm.train.global_batch=4",
        "token_lm.train.warmup_steps=1", "token_lm.train.eval_every=2", "token_lm.train.ckpt_every=2",
        "token_lm.seq.max_audio_tokens=60", "token_lm.seq.layouts=both", *extra])


@pytest.mark.parametrize("layouts", ["both", "any"])
def test_mixed_run_records_the_mix_and_resumes_exactly(sets, tmp_path, layouts):
    """Under layouts='any' (stage 4) each modality stream is a mix of the sources holding it."""
    a, b, ts = sets
    shards = f"[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]"
    extra = [f"token_lm.seq.layouts={layouts}", "token_lm.mmpt.golden_n=0"]
    full = token_lm_loop(make_cfg(shards, tmp_path / "full", *extra), LocalContext(), ts=ts, eval_start=False, **QUIET)
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())["data_mix"]
    assert m["samples"] == 16 and [s["path"] for s in m["sources"]] == [str(a), str(b)]
    assert [s["weight"] for s in m["sources"]] == [0.7, 0.3]
    assert sum(s["samples"] for s in m["sources"]) == 16 and abs(sum(s["fraction"] for s in m["sources"]) - 1) < 1e-9

    half = make_cfg(shards, tmp_path / "half", *extra)

    def stop(step, model):
        if step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        token_lm_loop(half, LocalContext(), hook=stop, ts=ts, eval_start=False, **QUIET)
    resumed = copy.deepcopy(half)
    resumed.token_lm.train.resume = "auto"
    r = token_lm_loop(resumed, LocalContext(), ts=ts, eval_start=False, **QUIET)
    st = load_state(tmp_path / "half" / "checkpoints" / "step-0000002")["data"]
    assert "sources" in (st["streams"]["image"] if layouts == "any" else st)  # per-source positions recorded
    assert len(r["loss_history"]) == 2
    for x, y in zip(full["loss_history"][2:], r["loss_history"]):
        assert abs(x - y) <= 1e-6
    assert abs(full["eval_loss"] - r["eval_loss"]) <= 1e-6
    assert r["data_mix"] == full["data_mix"]  # counted from the run's start, across the resume


def test_mixed_token_spaces_are_refused_before_training(sets, tmp_path, capsys):
    """A shard set of another token space in the mix: exit 2 and one line naming both paths and hashes.
    The other set is the same shards relabelled with another token space's hash and token_space.json
    (the check reads only index.json, before any sample)."""
    a, _, ts = sets
    other_ts = load_token_space(load_config(LumoConfig, None, ["uti.token_space.special_slots=65"]).uti)
    c = tmp_path / "other"
    shutil.copytree(a, c)
    index = json.loads((c / "index.json").read_text())
    (c / "index.json").write_text(json.dumps({**index, "token_space_hash": other_ts.hash}))
    other_ts.save(c)
    rc = main(["train", "token-lm", "--set", f"token_lm.shards=[{{path: {a}, weight: 1}}, {{path: {c}, weight: 1}}]",
               "--out", str(tmp_path / "run")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert str(a) in err[0] and str(c) in err[0] and ts.hash in err[0] and other_ts.hash in err[0], err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prepare_run_resolves_every_source_and_any_uses_the_sources_holding_a_modality(sets, tmp_path, monkeypatch):
    from lumo_ray.storage import resolve
    from trainers.token_lm import TrainSequences, prepare_run

    a, b, ts = sets
    img = tmp_path / "img"  # labelled image-only by its summary.json: the audio stream must skip it
    shutil.copytree(a, img)
    summary = json.loads((img / "summary.json").read_text())
    (img / "summary.json").write_text(json.dumps({**summary, "per_task": {"i2t": 12}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(LumoConfig, None, [f"token_lm.shards=[{{path: {a}, weight: 1}}, {{path: img, weight: 1}}]",
                                         f"token_lm.out={tmp_path / 'run'}", "token_lm.seq.layouts=any"])
    prepare_run(cfg)
    assert [s.path for s in cfg.token_lm.shards] == [resolve(str(a)), str(img.resolve())]
    assert load_config(LumoConfig, tmp_path / "run" / "config.yaml").token_lm.shards == cfg.token_lm.shards
    seqs = TrainSequences(cfg.token_lm, 0, None, ts, 0, 1)
    assert seqs.streams["image"][0] == [0, 1] and seqs.streams["audio"][0] == [0]
