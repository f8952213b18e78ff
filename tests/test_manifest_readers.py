"""Manifest schema, raw readers on the real samples, media probing and splits (no Ray)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lumo_ray.data.manifest import ManifestError, Record, read_manifest, write_manifest
from lumo_ray.data.probe import probe_record
from lumo_ray.data.readers import read_source
from lumo_ray.data.splits import apply_splits, assign_splits, check_leakage, group_hash, hash_split


# ---------------------------------------------------------------- readers on the real samples

def test_llava_reader_real_ids_from_keys(real_data):
    recs, errs = read_source("llava_pretrain", real_data / "llava_pretrain")
    raw = json.loads((real_data / "llava_pretrain" / "blip_laion_cc_sbu_sample.json").read_text())
    assert len(recs) == 44 and errs == []
    by_id = {r.id: r for r in recs}
    for e in raw:
        r = by_id[f"llava_pretrain:{e['id']}"]
        assert r.task == "i2t" and r.group == f"llava_pretrain:{e['image']}"
        assert r.text["prompt"] == e["conversations"][0]["value"] and "<image>" in r.text["prompt"]
        assert r.text["caption"] == e["conversations"][1]["value"]
        assert Path(r.media_path("image")).is_absolute() and Path(r.media_path("image")).is_file()


def test_ids_do_not_depend_on_list_position(real_data, tmp_path):
    src = real_data / "llava_pretrain"
    raw = json.loads((src / "blip_laion_cc_sbu_sample.json").read_text())
    (tmp_path / "images").symlink_to(src / "images")
    (tmp_path / "rev.json").write_text(json.dumps(raw[::-1][:10]))
    a = {r.id: r for r in read_source("llava_pretrain", src)[0]}
    b = read_source("llava_pretrain", tmp_path / "rev.json")[0]
    assert len(b) == 10
    for r in b:  # same id -> same sample, whatever its position in the list
        assert r.text == a[r.id].text and Path(r.media_path("image")).name == Path(a[r.id].media_path("image")).name


def test_audiocaps_reader_real(real_data):
    recs, errs = read_source("audiocaps", real_data / "audiocaps")
    assert len(recs) == 5 and errs == []
    ids = {r.id for r in recs}
    assert ids == {"audiocaps:65842", "audiocaps:21027", "audiocaps:109610", "audiocaps:17827", "audiocaps:13572"}
    for r in recs:
        assert r.task == "a2t" and Path(r.media_path("audio")).name == r.id.split(":")[1] + ".wav"
        assert Path(r.media_path("audio")).is_file() and r.text["caption"]


def test_audiocaps_group_is_the_youtube_clip(tmp_path):
    (tmp_path / "val.csv").write_text("audiocap_id,youtube_id,start_time,caption\n"
                                      "1,abc,30,a dog barks\n2,abc,30,a dog is barking\n3,xyz,0,rain\n")
    recs, _ = read_source("audiocaps", tmp_path)
    g = {r.id: r.group for r in recs}
    assert g["audiocaps:1"] == g["audiocaps:2"] != g["audiocaps:3"]


def test_clotho_reader_real_empty_captions_are_errors(real_data):
    recs, errs = read_source("clotho", real_data / "clotho")
    assert len(recs) == 5 and len(errs) == 20
    assert {e.reason for e in errs} == {"empty caption"} and {e.stage for e in errs} == {"read"}
    assert {r.id for r in recs} == {f"clotho:{n}#1" for n in ("WalkingNiven.wav", "apartment amb.wav", "hort.wav",
                                                              "heating_no contact.wav", "waterfall  06-09-2012.wav")}
    assert "clotho:hort.wav#3" in {e.id for e in errs}
    assert all(Path(r.media_path("audio")).is_file() for r in recs)


def test_clotho_captions_of_one_clip_share_a_group(real_data, tmp_path):
    shutil.copytree(real_data / "clotho", tmp_path / "c")
    f = tmp_path / "c" / "clotho_captions_sample.csv"
    rows = list(csv.reader(f.open()))
    rows[1][2] = "A second caption for the same walk."
    with f.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    recs, errs = read_source("clotho", f)
    assert len(recs) == 6 and len(errs) == 19
    walk = [r for r in recs if r.group == "clotho:WalkingNiven.wav"]
    assert sorted(r.id for r in walk) == ["clotho:WalkingNiven.wav#1", "clotho:WalkingNiven.wav#2"]
    assert len({r.media_path("audio") for r in walk}) == 1


def test_wavcaps_reader_real_and_default_audio_path(real_data, tmp_path):
    recs, errs = read_source("wavcaps", real_data / "wavcaps")
    assert len(recs) == 26 and errs == []
    assert all(Path(r.media_path("audio")).is_file() and r.group == r.id for r in recs)
    doc = json.loads((real_data / "wavcaps" / "wavcaps_sample.json").read_text())
    for e in doc["data"]:
        del e["audio"]  # fall back to audio/<id>
    (tmp_path / "audio").symlink_to(real_data / "wavcaps" / "audio")
    (tmp_path / "w.json").write_text(json.dumps(doc))
    recs2, _ = read_source("wavcaps", tmp_path / "w.json")
    assert {r.id for r in recs2} == {r.id for r in recs}
    assert all(Path(r.media_path("audio")).is_file() for r in recs2)


# ---------------------------------------------------------------- manifest files

def _rec(i: int, **kw) -> Record:
    d = dict(id=f"t:{i}", source="t", group=f"g{i}", task="t", text={"prompt": "", "caption": f"c{i}"})
    d.update(kw)
    return Record(**d)


def test_manifest_write_is_sorted_and_deterministic(tmp_path, real_data):
    recs, _ = read_source("audiocaps", real_data / "audiocaps")
    a = write_manifest(recs, tmp_path / "a.jsonl")
    b = write_manifest(list(reversed(recs)), tmp_path / "b.jsonl")
    assert a.read_bytes() == b.read_bytes()
    ids = [json.loads(l)["id"] for l in a.read_text().splitlines()]
    assert ids == sorted(ids)
    # usable after being copied elsewhere: paths are absolute
    moved = tmp_path / "elsewhere" / "m.jsonl"
    moved.parent.mkdir()
    shutil.copy(a, moved)
    back, errs = read_manifest(moved)
    assert errs == [] and [r.to_dict() for r in back] == [r.to_dict() for r in sorted(recs, key=lambda r: r.id)]
    with pytest.raises(ManifestError, match="duplicate id"):
        write_manifest([recs[0], recs[0]], tmp_path / "dup.jsonl")


def test_relative_paths_resolve_against_the_manifest_dir(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps(_rec(1, task="i2t", modalities={"image": {"path": "img/x.png"}}).to_dict()) + "\n")
    (recs, _) = read_manifest(tmp_path / "m.jsonl")
    assert recs[0].media_path("image") == str((tmp_path / "img" / "x.png").resolve())


def test_validating_reader_names_bad_lines(tmp_path):
    good = _rec(1).to_dict()
    no_group = {k: v for k, v in _rec(3).to_dict().items() if k != "group"}
    lines = [json.dumps(good), '{"id": "t:2", "source": ', json.dumps(no_group),
             json.dumps(_rec(4, task="x2y").to_dict()), "", json.dumps(_rec(5, split="test").to_dict())]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n")
    recs, errs = read_manifest(p)
    assert [r.id for r in recs] == ["t:1"]
    details = {e.id: e.detail for e in errs}
    assert "line 2: bad JSON" in details["m.jsonl:line2"]
    assert "line 3" in details["t:3"] and "group" in details["t:3"]
    assert "line 4" in details["t:4"] and "unknown task 'x2y'" in details["t:4"]
    assert "line 6" in details["t:5"] and "unknown split" in details["t:5"]
    assert all(e.stage == "read" for e in errs)
    with pytest.raises(ManifestError, match="line 2"):
        read_manifest(p, strict=True)


# ---------------------------------------------------------------- probing

def test_probe_real_media(real_data):
    a = probe_record(read_source("clotho", real_data / "clotho")[0][0])
    pa = a.meta["probe"]["audio"]
    assert (pa["sample_rate"], pa["channels"], pa["subtype"]) == (48000, 2, "FLOAT")
    assert abs(pa["seconds"] - 1.7) < 0.01
    i = probe_record(read_source("llava_pretrain", real_data / "llava_pretrain")[0][0])
    pi = i.meta["probe"]["image"]
    assert pi["width"] > 0 and pi["height"] > 0 and pi["format"] == "PNG"


def test_probe_bad_media_reasons(real_data, tmp_path):
    wav = (real_data / "clotho" / "audio" / "hort.wav").read_bytes()
    (tmp_path / "trunc.wav").write_bytes(wav[: len(wav) // 2])
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all" * 10)
    (tmp_path / "text.png").write_text("this is a text file, not a PNG\n")
    png = next((real_data / "llava_pretrain" / "images").glob("*.png")).read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    sf.write(tmp_path / "short.wav", np.zeros(240, dtype=np.float32), 24000)  # 10 ms
    cases = {"missing.wav": "missing file", "trunc.wav": "truncated audio", "garbage.wav": "undecodable audio",
             "short.wav": "too short", "text.png": "undecodable image", "cut.png": "undecodable image",
             "missing.png": "missing file"}
    for name, reason in cases.items():
        mod, task = ("image", "i2t") if name.endswith(".png") else ("audio", "a2t")
        rec = _rec(1, task=task, modalities={mod: {"path": str(tmp_path / name)}})
        err = probe_record(rec, min_audio_seconds=0.05)
        assert err.reason == reason and err.stage == "probe" and name in err.detail, (name, err)
    assert probe_record(_rec(2, task="a2t")).reason == "missing modality"


# ---------------------------------------------------------------- splits

def test_split_is_stable_when_samples_are_added_or_removed():
    groups = [f"g{i}" for i in range(2000)]
    full = assign_splits(groups, eval_permille=50, min_eval=10)
    assert 60 < sum(s == "eval" for s in full.values()) < 140  # ~5 %
    part = assign_splits(groups[:700] + groups[1500:], eval_permille=50, min_eval=10)
    more = assign_splits(groups + [f"new{i}" for i in range(500)], eval_permille=50, min_eval=10)
    for g, s in part.items():
        assert full[g] == s == hash_split(g, 50)
    assert all(more[g] == s for g, s in full.items())


def test_min_eval_moves_smallest_hash_groups_deterministically():
    groups = [f"clip{i}" for i in range(20)]
    base = assign_splits(groups, eval_permille=0, min_eval=0)
    assert set(base.values()) == {"train"}
    s = assign_splits(list(reversed(groups)), eval_permille=0, min_eval=3)
    expected = sorted(groups, key=group_hash)[:3]
    assert sorted(g for g, v in s.items() if v == "eval") == sorted(expected)
    assert assign_splits(groups, 0, 3) == s
    assert list(assign_splits(["only"], 0, 5).values()) == ["train"]  # train never emptied


def test_groups_never_straddle_and_leakage_check(real_data):
    recs, _ = read_source("wavcaps", real_data / "wavcaps")
    clotho = [_rec(i, group="clip") for i in range(5)]
    apply_splits(recs + clotho, eval_permille=500, min_eval=1)
    assert len({r.split for r in clotho}) == 1
    assert check_leakage(recs + clotho)["ok"]
    clotho[0].split = "eval" if clotho[1].split == "train" else "train"
    bad = check_leakage(recs + clotho + [clotho[2]])
    assert bad["groups_in_both"] == ["clip"] and bad["duplicate_ids"] == [clotho[2].id] and not bad["ok"]
