"""SPEC §6 generation fidelity: caption parsing, the probe on real codes (oracle generations pass,
caption-blind ones fail), an untrained and an x2t-only run fail through real generation, CLI exit."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from lumo_ray.cli import main
from lumo_ray.codecs.text import build_text_adapter
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.config.lm import FidelityConfig
from lumo_ray.data import synth
from pipelines.synth_shards import build_synth_shards
from lumo_ray.eval.fidelity import (ATTRIBUTES, CNN_BELOW, CaptionError, fit_probe, load_items, parse_caption,
                                    run_fidelity, score_generations, select_eval, summary_lines)
from lumo_ray.eval.gates import _swap_partners
from lumo_ray.generate import load_run
from lumo_ray.uti import build_adapters, load_token_space
from test_generate_decode import make_tiny_run

QUIET = dict(log=lambda *a, **k: None)
GATED = {"image": "colour", "audio": "pitch"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    # 160 images + 160 clips, a quarter in eval: enough for the probe to read colour / pitch.
    # LUMO_FIDELITY_TEST_DATA: a persistent folder to reuse between pytest runs while developing
    root = Path(os.environ.get("LUMO_FIDELITY_TEST_DATA") or tmp_path_factory.getbasetemp() / "fidelity_synth160")
    shards, _, cfg = build_synth_shards(root, 160, 160, **QUIET)
    return shards, load_token_space(cfg.uti), cfg


@pytest.fixture(scope="module")
def untrained(data, tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("fid_untrained"))


def test_parse_caption_covers_the_synthetic_vocabulary_and_refuses_the_rest():
    for shape in synth.SHAPES:
        for colour in synth.COLOURS:
            for count in (1, 2, 3, 4):
                for pos in synth.POSITIONS:
                    cap = synth.image_caption(shape, colour, count, pos)
                    assert parse_caption("image", cap) == {"colour": colour, "shape": shape, "count": count,
                                                           "position": pos}
    for count in (1, 2, 3, 4):
        for length in synth.LENGTHS:
            for pitch in synth.PITCHES:
                cap = synth.audio_caption(count, length, pitch)
                assert parse_caption("audio", cap) == {"pitch": pitch, "count": count, "length": length}
    assert parse_caption("image", "  Two RED circles on the left. ")["count"] == 2
    for m, bad in (("image", "two purple circles on the left"), ("image", "one red circles on the left"),
                   ("image", "a dog on a sofa"), ("audio", "three short high beep"), ("audio", "two red circles")):
        with pytest.raises(CaptionError, match="sample s-7"):
            parse_caption(m, bad, "s-7")


def _oracle_setup(data, n=64):
    shards, ts, cfg = data
    decode = build_text_adapter(cfg.uti.text).decode
    train, evals = load_items(shards, ts, "train", decode), load_items(shards, ts, "eval", decode)
    fc = FidelityConfig(n=n)
    # what a run generates: a full image grid, and (tiny audio preset) max_audio_tokens ids of audio
    image = build_adapters(cfg.uti).image
    tokens = {"image": image.tokens_per_image, "audio": cfg.token_lm.seq.max_audio_tokens}
    decode = {"image": image.decode, "audio": None}
    probes = {m: fit_probe(ts, m, train[m], tokens[m], fc.seed, decode[m]) for m in ATTRIBUTES}
    items = {m: select_eval(evals[m], fc.n, fc.seed, m) for m in ATTRIBUTES}
    partners = {m: _swap_partners([[str(it.attrs[GATED[m]])] for it in items[m]], np.random.default_rng(1))
                for m in ATTRIBUTES}
    return fc, probes, items, partners


def test_oracle_generations_pass_and_caption_blind_ones_fail(data):
    fc, probes, items, partners = _oracle_setup(data)
    real = {m: [it.ids for it in items[m]] for m in ATTRIBUTES}
    other = {m: [items[m][j].ids for j in partners[m]] for m in ATTRIBUTES}
    # oracle: the "generated" codes are the eval samples' real codes, swapped ones a partner's real codes
    rep = score_generations(probes, items, real, other, fc)
    ceilings = {}
    for m, a in GATED.items():
        x = rep["modalities"][m]["attributes"][a]
        ceilings[m] = {k: [round(v["ceiling"], 3), v["probe"]["features"]]
                       for k, v in rep["modalities"][m]["attributes"].items()}
        assert x["gated"] and x["generated"] == x["ceiling"] and rep["n"][m] == len(items[m]) >= 30
        if x["ceiling"] >= fc.probe_min:
            assert x["pass"], x["reason"]
            assert x["swapped"] < x["generated"] and x["paired"]["p"] < fc.max_p
        else:  # a codec whose codes do not show the attribute: the gate says the probe cannot read it
            assert not x["pass"] and "probe cannot read" in x["reason"]
        for b, y in rep["modalities"][m]["attributes"].items():
            assert y["gated"] == (b == a) and ("pass" in y) == (b == a)
    print("probe ceilings on real eval codes:", json.dumps(ceilings))
    assert rep["pass"] == all(rep["modalities"][m]["attributes"][a]["pass"] for m, a in GATED.items())
    # the tiny codecs show both gated attributes (image colour via the decoded pixels): the oracle passes
    assert rep["pass"] and rep["modalities"]["image"]["attributes"]["colour"]["probe"]["features"].startswith("pixels")
    # an image attribute the linear probe reads below CNN_BELOW in CV is read by the pixel CNN
    for a, y in rep["modalities"]["image"]["attributes"].items():
        weak = max(y["probe"]["cv_accuracy"].values()) < CNN_BELOW
        assert (y["probe"]["features"] == "pixels CNN") == weak, (a, y["probe"])
        assert y["probe_reads"] == (y["ceiling"] >= fc.probe_min)
    # a probe held to more than it can read: the gated attributes fail saying so, the reported are marked
    strict = score_generations(probes, items, real, other, FidelityConfig(n=fc.n, probe_min=1.01))
    assert not strict["pass"]
    for m, a in GATED.items():
        x = strict["modalities"][m]["attributes"][a]
        assert not x["pass"] and "probe cannot read" in x["reason"] and not x["checks"]["probe_reads"]
    assert all("the probe cannot read it" in ln for ln in summary_lines(strict) if "reported" in ln)
    # a model that ignores its caption: the generated codes are as good as the swapped ones -> FAIL
    blind = score_generations(probes, items, other, other, fc)
    for m, a in GATED.items():
        x = blind["modalities"][m]["attributes"][a]
        assert not x["pass"] and x["generated"] == x["swapped"]
    assert not blind["pass"]
    # unreadable spans (wrong length / phase) count as wrong, never as dropped
    broken = {m: [s[: len(s) // 2 + 1] for s in real[m]] for m in ATTRIBUTES}
    bad = score_generations(probes, items, broken, other, fc)
    for m, a in GATED.items():
        r = bad["modalities"][m]
        assert r["unreadable"]["generated"] == len(items[m]) and r["attributes"][a]["generated"] == 0.0
    assert not bad["pass"]


def test_untrained_run_fails_through_generation_and_is_deterministic(data, untrained, tmp_path):
    shards, _, _ = data
    run = load_run(untrained)
    fc = FidelityConfig(n=16, samples=2)
    rep = run_fidelity(run, tmp_path / "a", fc, shards=str(shards), **QUIET)
    assert not rep["pass"]
    for m, a in GATED.items():
        r = rep["modalities"][m]
        assert r["n"] == 16 and not r["attributes"][a]["pass"] and r["attributes"][a]["reason"]
        assert set(r["attributes"]) == set(ATTRIBUTES[m]) and r["unreadable"]["generated"] == 0
        assert len(rep["samples"][m]) == 2 and all((tmp_path / "a" / s["file"]).exists() for s in rep["samples"][m])
    md = (tmp_path / "a" / "report.md").read_text()
    assert md.startswith("# Generation fidelity: FAIL") and "| image | colour |" in md and "| audio | pitch |" in md
    assert json.loads((tmp_path / "a" / "report.json").read_text())["pass"] is False
    again = run_fidelity(run, tmp_path / "b", fc, shards=str(shards), **QUIET)
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()
    assert again == rep


def test_x2t_only_run_fails(data, tmp_path):
    from trainers.context import LocalContext
    from trainers.token_lm import token_lm_loop

    shards, ts, _ = data
    cfg = load_config(LumoConfig, None, [
        f"token_lm.shards={shards}", f"token_lm.out={tmp_path}", "token_lm.train.steps=6",
        "token_lm.train.global_batch=4", "token_lm.train.warmup_steps=2", "token_lm.train.eval_every=6",
        "token_lm.train.ckpt_every=6", "token_lm.seq.layouts=own", "token_lm.fidelity.n=16"])
    token_lm_loop(cfg, LocalContext(), ts=ts, **QUIET)
    rep = run_fidelity(tmp_path, tmp_path / "fidelity", **QUIET)  # the run config's fidelity section and shards
    assert not rep["pass"] and rep["n"] == {"image": 16, "audio": 16}
    for m, a in GATED.items():
        assert not rep["modalities"][m]["attributes"][a]["pass"]
    pitch = rep["modalities"]["audio"]["attributes"]["pitch"]  # read on real clips: the generations fail it
    assert pitch["checks"]["probe_reads"] and "cannot read" not in pitch["reason"]
    # the same stage-3.3-style run fails the prompt gate: it never learned media from a caption
    from lumo_ray.eval.gates import run_prompt_gate

    pr = run_prompt_gate(load_run(tmp_path), tmp_path / "prompts", n=32, log=lambda *a: None)
    assert not pr["pass"] and not (pr["tasks"]["t2i"]["pass"] and pr["tasks"]["t2a"]["pass"])


def test_cli_exit_status_and_verdict(data, untrained, tmp_path, capsys):
    shards, _, _ = data
    rc = main(["eval", "fidelity", "--run", str(untrained), "--out", str(tmp_path / "cli"), "--n", "8",
               "--shards", str(shards), "--set", "token_lm.fidelity.samples=1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert out[-1].startswith("generation fidelity FAIL:") and out[-1].endswith("report.md")
    assert any(line.split()[:2] == ["image", "colour"] and "FAIL" in line for line in out)
    rep = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert rep["n"] == {"image": 8, "audio": 8} and rep["config"]["samples"] == 1
