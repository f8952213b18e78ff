"""The normalize job end to end through Ray Data: real samples, bad inputs, the error-rate ceiling."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lumo_ray.config import LumoConfig, NormalizeConfig, load_config
from lumo_ray.data.manifest import read_errors, read_manifest
from lumo_ray.data.normalize import NormalizeError, normalize_local
from pipelines.normalize import main, run_normalize

REAL_COUNTS = {"llava_pretrain": 44, "audiocaps": 3, "wavcaps": 26}
# The AudioCaps sample gives one recording (the same bytes) under three audiocap_ids with three unrelated
# captions and no youtube_id: normalize keeps the first and records the other two as duplicates.
REAL_DUPLICATES = {"audiocaps": 2}


def test_normalize_real_samples_through_ray(ray_local, real_data, tmp_path):
    for source, n in REAL_COUNTS.items():
        out = tmp_path / source
        s = run_normalize(source, real_data / source, out, NormalizeConfig())
        dups = REAL_DUPLICATES.get(source, 0)
        assert (s["ok"], s["errors"], s["duplicates"], s["error_rate"]) == (n, dups, dups, 0.0)
        recs, bad = read_manifest(out / "manifest.jsonl")
        assert bad == [] and len(recs) == n
        assert [e.reason for e in read_errors(out / "errors.jsonl")] == ["duplicate media"] * dups
        assert [r.id for r in recs] == sorted(r.id for r in recs)
        assert all(r.split in ("train", "eval") and r.meta["probe"] for r in recs)
        assert s["per_split"]["eval"]["samples"] >= 1 and s["leakage"]["ok"]
        assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s, sort_keys=True))
        assert load_config(LumoConfig, out / "config.yaml").data.normalize == NormalizeConfig()
    # Ray output == plain-loop output, byte for byte (order never depends on scheduling)
    normalize_local("audiocaps", real_data / "audiocaps", tmp_path / "local", NormalizeConfig(probe_batch_size=2))
    for f in ("manifest.jsonl", "errors.jsonl", "summary.json"):
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "audiocaps" / f).read_bytes()


def test_clotho_empty_captions_trip_the_ceiling_after_writing(ray_local, real_data, tmp_path):
    out = tmp_path / "clotho"
    with pytest.raises(NormalizeError, match=r"error rate 0\.800 > ceiling 0\.5.*empty caption: 20"):
        run_normalize("clotho", real_data / "clotho", out, NormalizeConfig())
    errs = read_errors(out / "errors.jsonl")  # files are written before the gate fails
    assert len(errs) == 20 and {e.reason for e in errs} == {"empty caption"}
    recs, _ = read_manifest(out / "manifest.jsonl")
    assert len(recs) == 5 and {r.id.split("#")[1] for r in recs} == {"1"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_reason"] == {"empty caption": 20} and summary["total"] == 25
    # the CLI entry point: exit 1 on the gate, 0 when the ceiling allows it
    assert main(["--source", "clotho", "--input", str(real_data / "clotho"), "--out", str(tmp_path / "c1")]) == 1
    assert main(["--source", "clotho", "--input", str(real_data / "clotho"), "--out", str(tmp_path / "c2"),
                 "--set", "data.normalize.error_rate_ceiling=0.9"]) == 0


def test_each_bad_input_is_recorded_and_the_job_completes(ray_local, real_data, tmp_path, capsys):
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(next((real_data / "llava_pretrain" / "images").glob("*.png")), media / "good.png")
    shutil.copy(real_data / "clotho" / "audio" / "hort.wav", media / "good.wav")
    wav = (media / "good.wav").read_bytes()
    (media / "trunc.wav").write_bytes(wav[: len(wav) // 3])
    (media / "text.png").write_text("hello, I am not an image\n")
    sf.write(media / "short.wav", np.zeros(100, dtype=np.float32), 24000)

    def rec(i, task, mod, path, caption="a caption"):
        return {"id": f"j:{i}", "source": "mixed", "group": f"g{i}", "task": task,
                "modalities": {mod: {"path": path}}, "text": {"prompt": "", "caption": caption}, "meta": {}}

    lines = [json.dumps(rec(1, "i2t", "image", "media/good.png")),
             json.dumps(rec(2, "a2t", "audio", "media/good.wav")),
             json.dumps(rec(3, "t2a", "audio", "media/good.wav")),
             json.dumps(rec(4, "a2t", "audio", "media/missing.wav")),
             json.dumps(rec(5, "a2t", "audio", "media/trunc.wav")),
             json.dumps(rec(6, "i2t", "image", "media/text.png")),
             json.dumps(rec(7, "a2t", "audio", "media/short.wav")),
             json.dumps(rec(8, "i2t", "image", "media/good.png", caption="  ")),
             '{"id": "j:9", "task": "a2t", oops}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    cfg = NormalizeConfig(error_rate_ceiling=0.9, probe_batch_size=2)
    s = run_normalize("jsonl", tmp_path / "in.jsonl", tmp_path / "out", cfg)
    out_text = capsys.readouterr().out
    (warn,) = [x for x in out_text.splitlines() if "WARNING" in x]
    assert warn.startswith("[normalize] WARNING: dropped 6 of 9 records (66.7%): ") and str(tmp_path / "out" / "errors.jsonl") in warn
    errs = {e.id: e for e in read_errors(tmp_path / "out" / "errors.jsonl")}
    reasons = {i: e.reason for i, e in errs.items()}
    assert reasons == {"j:4": "missing file", "j:5": "truncated audio", "j:6": "undecodable image",
                       "j:7": "too short", "j:8": "empty caption",
                       "in.jsonl:line9": "malformed manifest line (bad JSON)"}
    assert "line 9" in errs["in.jsonl:line9"].detail and "trunc.wav" in errs["j:5"].detail
    recs, _ = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [r.id for r in recs] == ["j:1", "j:2", "j:3"]
    assert (s["ok"], s["errors"], s["total"]) == (3, 6, 9) and abs(s["error_rate"] - 6 / 9) < 1e-6
    assert s["per_stage"] == {"probe": 4, "read": 2}


def test_a_normalized_folder_is_a_valid_jsonl_input(real_data, tmp_path):
    first = normalize_local("wavcaps", real_data / "wavcaps", tmp_path / "a")
    again = normalize_local("jsonl", tmp_path / "a", tmp_path / "b")  # reads manifest.jsonl, not errors.jsonl
    assert (again["ok"], again["errors"]) == (first["ok"], 0)
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (tmp_path / "b" / "manifest.jsonl").read_bytes()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jsonl").write_text("")
    with pytest.raises(NormalizeError, match="no samples"):
        normalize_local("jsonl", tmp_path / "empty", tmp_path / "c")


def test_exact_duplicate_media_are_recorded_and_the_first_kept(tmp_path):
    from lumo_ray.data.manifest import Record, write_manifest
    from lumo_ray.data.synth import write_synth

    imgs = sorted((Path(write_synth(tmp_path / "s", 2, 0)["llava_pretrain_dir"])).rglob("*.png"))
    copy = tmp_path / "copy.png"
    shutil.copy(imgs[0], copy)

    def rec(i, group, path, caption):
        return Record(id=i, source="s", group=group, task="i2t", modalities={"image": {"path": str(path)}},
                      text={"prompt": "", "caption": caption})
    src = tmp_path / "in"
    write_manifest([rec("a", "g1", imgs[0], "a cat"),
                    rec("b", "g2", copy, "a dog"),              # the same bytes under another key: duplicate
                    rec("c", "g1", imgs[0], "a cat"),           # the same sample twice: duplicate
                    rec("d", "g1", copy, "a cat on a mat"),     # another caption of the same item: kept
                    rec("e", "g3", imgs[1], "a cat")], src / "m.jsonl")
    summary = normalize_local("jsonl", src, tmp_path / "out")
    assert sorted(r.id for r in read_manifest(tmp_path / "out" / "manifest.jsonl")[0]) == ["a", "d", "e"]
    errs = {e.id: e for e in read_errors(tmp_path / "out" / "errors.jsonl")}
    assert set(errs) == {"b", "c"} and all(e.reason == "duplicate media" and e.stage == "dedupe" for e in errs.values())
    assert "duplicate of a (same media content, group 'g1')" in errs["b"].detail and str(copy) in errs["b"].detail
    assert "duplicate of a (same media content and caption)" in errs["c"].detail
    assert summary["duplicates"] == 2 and summary["error_rate"] == 0.0  # recorded, not counted as bad input
