"""Caption accuracy (i2t / a2t, lumo_ray/eval/captions.py): the parser reads every synthetic caption back;
the per-attribute gate passes reference captions, fails swapped ones and an untrained run's; the fidelity
evaluation carries it (reported, not gated by default) with the field's metrics, into report.md and the
demo report's section."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from lumo_ray.config.lm import FidelityConfig
from lumo_ray.data import synth
from lumo_ray.eval.captions import generate_captions, parse_caption, read_caption, score_captions, swap_partners
from lumo_ray.eval.fidelity import ATTRIBUTES, Item
from lumo_ray.generate import GenOptions, load_run
from lumo_ray.runtime import torch_threads
from test_generate_decode import make_tiny_run

QUIET = dict(log=lambda *a, **k: None)


def _image_attrs(i: int, seed: int = 0) -> dict:
    a = synth.draw_scene(np.random.default_rng([seed, 0, i]))
    return {k: a[k] for k in ATTRIBUTES["image"]}


def _audio_attrs(i: int, seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, 1, i])  # the order write_synth draws them in
    count = int(rng.integers(1, 5))
    length = list(synth.LENGTHS)[rng.integers(len(synth.LENGTHS))]
    return {"pitch": list(synth.PITCHES)[rng.integers(len(synth.PITCHES))], "count": count, "length": length}


def _caption(m: str, a: dict) -> str:
    return (synth.image_caption(a["shape"], a["colour"], a["count"], a["position"]) if m == "image"
            else synth.audio_caption(a["count"], a["length"], a["pitch"]))


def _items(m: str, n: int, ids=None) -> list[Item]:
    draw = _image_attrs if m == "image" else _audio_attrs
    return [Item(f"{m}-{i:03d}", _caption(m, a), a, np.zeros(1, np.int64) if ids is None else ids[i])
            for i, a in enumerate(draw(i) for i in range(n))]


def test_parser_round_trips_every_synthetic_caption():
    n = 0
    for shape in synth.SHAPES:
        for colour in synth.COLOURS:
            for count in range(1, len(synth.COUNT_WORDS) + 1):
                for pos in synth.POSITIONS:
                    a = {"colour": colour, "shape": shape, "count": count, "position": pos}
                    assert read_caption("image", _caption("image", a)) == a
                    n += 1
    for count in range(1, len(synth.COUNT_WORDS) + 1):
        for length in synth.LENGTHS:
            for pitch in synth.PITCHES:
                a = {"pitch": pitch, "count": count, "length": length}
                assert read_caption("audio", _caption("audio", a)) == a
                n += 1
    assert n == 3 * 4 * 4 * 5 + 4 * 2 * 3
    # what a model may emit around a right caption: case, spacing, a full stop
    assert read_caption("image", " Two RED  circles on the left.")["colour"] == "red"
    for m, bad in (("image", "two red circle on the left"), ("image", "two red circles"), ("image", ""),
                   ("audio", "three short high beep"), ("audio", "three short high beeps beeps"), ("audio", None)):
        assert read_caption(m, bad) is None


@pytest.mark.parametrize("m", ["image", "audio"])
def test_gate_passes_reference_captions_and_fails_swapped_ones(m):
    cfg = FidelityConfig()
    items = _items(m, 64)
    partners = swap_partners(items, cfg.seed, m)
    assert all(items[j].caption != it.caption for it, j in zip(items, partners))
    good = score_captions(m, items, [it.caption for it in items], partners, cfg)
    assert good["pass"] and good["unparseable"] == 0 and good["gating"] is False
    for a, x in good["attributes"].items():
        assert x["generated"] == 1.0 and x["ceiling"] == 1.0 and x["gated"] and x["pass"], (a, x)
        assert x["swapped"] < x["target"] <= 1.0 and x["paired"]["p"] < cfg.max_p
        assert x["chance"] == max(np.mean([str(it.attrs[a]) == v for it in items])
                                  for v in {str(it.attrs[a]) for it in items})  # the majority-class rate
    assert good["samples"][0]["read"] == items[0].attrs and all(good["samples"][0]["right"].values())
    # a caption-blind model: each sample gets another sample's caption (not the floor's partner)
    other = swap_partners(items, cfg.seed + 1, m)
    blind = score_captions(m, items, [items[j].caption for j in other], partners, cfg)
    assert not blind["pass"]
    assert all(not x["pass"] and x["generated"] < x["target"] for x in blind["attributes"].values())
    # captions that describe exactly the floor's samples: the floor reads them all right, generated is below it
    same = score_captions(m, items, [items[j].caption for j in partners], partners, cfg)
    assert all(x["swapped"] == 1.0 and "<= swapped" in x["reason"] for x in same["attributes"].values())


def test_unparseable_captions_are_wrong_on_every_attribute_and_counted():
    cfg = FidelityConfig()
    items = _items("image", 32)
    caps = [it.caption if i % 2 else "a dog on a sofa" for i, it in enumerate(items)]
    caps[1] = None  # not decodable as text
    r = score_captions("image", items, caps, swap_partners(items, 0, "image"), cfg)
    assert r["unparseable"] == 17 and not r["pass"]
    for a, x in r["attributes"].items():
        assert x["generated"] == pytest.approx(15 / 32)
    assert r["samples"][0]["read"] is None and not any(r["samples"][0]["right"].values())
    empty = score_captions("audio", [], [], [], cfg)
    assert not empty["pass"] and empty["reason"] == "no audio eval samples"


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    return load_run(make_tiny_run(tmp_path_factory.mktemp("cap_untrained")))


def _encoded_items(run, m: str, n: int) -> list[Item]:
    """Synthetic media encoded with the run's own codecs (as the golden set is)."""
    items = _items(m, n)
    with torch_threads(1):
        if m == "image":
            ad = run.adapters.image
            codes = ad.encode_batch([ad.prepare(synth.make_image(**it.attrs, background=synth.BACKGROUNDS[0],
                                                                 jitter=(0, 0)), it.id) for it in items])
            ids = [run.ts.image_to_global(c) for c in codes]
        else:
            ad = run.adapters.audio
            clips = [ad.prepare(synth.make_beeps(it.attrs["count"], it.attrs["length"], it.attrs["pitch"],
                                                 np.random.default_rng(i)), synth.SAMPLE_RATE, it.id)
                     for i, it in enumerate(items)]
            ids = [run.ts.audio_to_global(c.codes) for c in ad.encode_batch(clips)]
    return [Item(it.id, it.caption, it.attrs, i) for it, i in zip(items, ids)]


@pytest.mark.parametrize("m", ["image", "audio"])
def test_untrained_run_captions_fail(untrained, m):
    cfg = FidelityConfig()
    items = _encoded_items(untrained, m, 12)
    caps = generate_captions(untrained, m, items, GenOptions(seed=0))
    assert len(caps) == 12 and caps == generate_captions(untrained, m, items, GenOptions(seed=0))  # seeded
    r = score_captions(m, items, caps, swap_partners(items, 0, m), cfg)
    assert not r["pass"] and r["unparseable"] >= 10  # random text is not the grammar's
    assert all(not x["pass"] for x in r["attributes"].values())


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    from pipelines.synth_shards import build_synth_shards

    # the shards of tests/test_fidelity.py (the same folder: built once per session, reused when present)
    root = Path(os.environ.get("LUMO_FIDELITY_TEST_DATA") or tmp_path_factory.getbasetemp() / "fidelity_synth160")
    return build_synth_shards(root, 160, 160, **QUIET)[0]


def test_fidelity_report_carries_captions_and_field_metrics(untrained, shards, tmp_path):
    from lumo_ray.eval.fidelity import run_fidelity
    from lumo_ray.eval.report_sections import captions_section, generations_section

    fc = FidelityConfig(n=8, samples=2)
    rep = run_fidelity(untrained, tmp_path / "mmpt" / "fidelity", fc, shards=str(shards), **QUIET)
    # reported, not gated: the verdict is the probe's alone
    assert rep["pass"] == all(r["pass"] for r in rep["modalities"].values())
    for m, task in (("image", "i2t"), ("audio", "a2t")):
        c = rep["captions"][m]
        assert c["task"] == task and c["n"] == 8 and not c["gating"] and not c["pass"]
        assert set(c["attributes"]) == set(ATTRIBUTES[m]) and len(c["samples"]) == 8
        assert all((tmp_path / "mmpt" / "fidelity" / s["file"]).exists() for s in c["samples"][:2])
        f = rep["field_metrics"][task]
        assert f["n"] == 8 and 0 <= f["bleu4"] <= 1 and f["cider_d"] >= 0
    t2i = rep["field_metrics"]["t2i"]
    assert t2i["clip"] == "tiny" and t2i["n"] == 8 and t2i["undecodable"] == 0 and t2i["frechet_clip"] > 0
    assert all(0 <= v <= 100 for v in t2i["clipscore"].values())
    md = (tmp_path / "mmpt" / "fidelity" / "report.md").read_text()
    assert "## Caption accuracy (i2t / a2t): reported, not gated" in md and "| i2t | colour |" in md
    assert "CIDEr-D" in md and "CLIPScore" in md
    assert json.loads((tmp_path / "mmpt" / "fidelity" / "report.json").read_text())["captions"]["audio"]["n"] == 8
    html = captions_section(tmp_path / "mmpt" / "fidelity")
    assert "reported, not gated" in html and html.count("data:image/png") == 2 and html.count("data:audio/wav") == 2
    assert "the parser read" in html and "Fréchet CLIP distance" in html
    # the t2i / t2a samples: prompt, generated media, what the probe read, right or wrong per attribute
    gen = generations_section(tmp_path / "mmpt" / "fidelity")
    assert gen.count("data:image/png") == 2 and gen.count("data:audio/wav") == 2 and "the probe read" in gen
    for m in ATTRIBUTES:
        for s in rep["samples"][m]:
            want = parse_caption(m, s["caption"])
            marks = ", ".join(f"{a} {'right' if str(v) == str(want[a]) else 'WRONG'}" for a, v in s["read"].items())
            assert marks in gen  # each attribute checked against its prompt
    assert "WRONG" in gen  # an untrained model misses some
    # gated: the caption verdicts now count
    gated = run_fidelity(untrained, tmp_path / "gated", FidelityConfig(n=8, samples=0, gate_captions=True),
                         shards=str(shards), **QUIET)
    assert gated["captions"]["image"]["gating"] and not gated["pass"]
    with pytest.raises(ValueError, match="gate_captions"):
        run_fidelity(untrained, tmp_path / "x", FidelityConfig(captions=False, gate_captions=True), shards=str(shards))
