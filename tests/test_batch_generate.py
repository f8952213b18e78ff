"""`lumo generate --manifest`: generation over a dataset on a Ray Data actor pool. Byte-identical
outputs for 1 and 2 actors, a run interrupted mid-way finishes the rest on a re-run, a record that
cannot be generated is a row of errors.jsonl and the others go on."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lumo_ray.data.manifest import write_manifest
from lumo_ray.data.normalize import read_and_dedupe
from lumo_ray.data.synth import write_synth
from lumo_ray.generate import GenOptions
from pipelines.batch_generate import run_batch_generate
from test_generate_decode import make_tiny_run

QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny token-LM run and a 36-record manifest: 32 captioned images, 4 clips (4 units of 8 for two
    actors, 8 units of 4 for a run stopped midway: what the tests need, each image a generation)."""
    d = tmp_path_factory.mktemp("batchgen")
    write_synth(d / "synth", 32, 4, seed=5)
    recs = read_and_dedupe("llava_pretrain", d / "synth" / "llava_pretrain")[0] + \
        read_and_dedupe("audiocaps", d / "synth" / "audiocaps")[0]
    manifest = d / "manifest.jsonl"
    write_manifest(recs, manifest)
    return make_tiny_run(d / "run"), manifest, recs


@pytest.fixture(scope="module")
def seed3(inputs, tmp_path_factory, ray_local):
    """An uninterrupted run with seed 3 in 8 units of 4: another seed's generation for the first test,
    the reference bytes for the stopped run's. Neither test changes it."""
    run, manifest, _ = inputs
    out = tmp_path_factory.mktemp("seed3") / "ref"
    return out, run_batch_generate(str(manifest), str(run), "t2i", out, GenOptions(seed=3), unit_size=4, **QUIET)


def digest(out: Path) -> dict[str, str]:
    """sha256 of every output file but the settings (which name the run's location)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "options.json"}


def test_one_and_two_actors_write_the_same_bytes(inputs, seed3, tmp_path, ray_local):
    run, manifest, recs = inputs
    assert len(recs) == 36
    s1 = run_batch_generate(str(manifest), str(run), "t2i", tmp_path / "a1", GenOptions(seed=7), actors=1, unit_size=8, **QUIET)
    s2 = run_batch_generate(str(manifest), str(run), "t2i", tmp_path / "a2", GenOptions(seed=7), actors=2, unit_size=8, **QUIET)
    assert s1 == s2 and s1["records"] == 36 and s1["generated"] == 32 and s1["skipped"] == {"no image": 4}
    assert s1["errors"] == 0 and s1["samples"] == 32 and s1["units"] == 4
    d1, d2 = digest(tmp_path / "a1"), digest(tmp_path / "a2")
    assert d1 == d2 and len([k for k in d1 if k.startswith("media/")]) == 32
    rows = [json.loads(x) for x in (tmp_path / "a1" / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows) and rows[0]["seed"] == 7 + rows[0]["index"]
    caption = next(r.text["caption"] for r in recs if r.id == rows[0]["id"])
    assert rows[0]["prompt"] == caption and (tmp_path / "a1" / rows[0]["samples"][0]["file"]).suffix == ".png"
    # another seed is another generation
    a3, s3 = seed3
    assert s3["generated"] == 32 and (a3 / "results.jsonl").read_bytes() != (tmp_path / "a1" / "results.jsonl").read_bytes()


def test_a_run_stopped_midway_finishes_the_rest(inputs, seed3, tmp_path, ray_local):
    """Ctrl-C on a running `lumo generate --manifest` stops it with the finished units kept and no
    results.jsonl; a re-run generates only the rest. Whether Ctrl-C lands before the last unit depends on
    the machine (a driver can receive every unit at once), so the state a stopped run leaves (some units,
    a unit half-written, no results) is also made by hand from a finished run, and the re-run must
    finish it to the bytes of an uninterrupted run."""
    run, manifest, _ = inputs
    ref = seed3[0]
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "lumo_ray.cli", "generate", "--manifest", str(manifest), "--run", str(run),
           "--task", "t2i", "--out", str(out), "--seed", "3", "--unit-size", "4"]
    # both commands join the session's Ray (RAY_ADDRESS) instead of starting one of their own (10-20 s each)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((out / "parts").glob("unit-*.jsonl"))) < 2:
        assert p.poll() is None, p.stdout.read()[-3000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)  # Ctrl-C mid-run
    text = p.communicate(timeout=120)[0]
    if p.returncode != 0:  # it was stopped: the finished units stay, nothing else is written
        assert p.returncode == 130 and "interrupted" in text, text[-3000:]
        assert not (out / "results.jsonl").exists()
    parts = sorted((out / "parts").glob("unit-*.jsonl"))
    assert len(parts) >= 2
    for f in parts[len(parts) // 2:]:  # the state of a run stopped half-way, whatever happened above
        f.unlink()
    parts[-1].with_name(parts[-1].name + ".tmp").write_text("half a unit")
    (out / "results.jsonl").unlink(missing_ok=True)
    done = len(parts) // 2
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"({done} done, {8 - done} to generate)" in r.stdout
    assert digest(out) == digest(ref) and not list((out / "parts").glob("*.tmp"))


def test_a_record_that_cannot_be_generated_is_an_error_row(inputs, tmp_path, ray_local):
    run, manifest, recs = inputs
    images = [r for r in recs if r.media_path("image")][:4]
    bad = Path(images[1].media_path("image"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
    images[1].modalities["image"]["path"] = str(broken)
    m = tmp_path / "m.jsonl"
    write_manifest(images, m)
    lines = []
    s = run_batch_generate(str(m), str(run), "i2t", tmp_path / "out", GenOptions(seed=0, max_text_tokens=8),
                           log=lines.append)
    assert s["generated"] == 3 and s["errors"] == 1
    (err,) = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert err["id"] == images[1].id and err["source"] == str(broken) and err["stage"] == "generate"
    assert any("dropped" in x or "WARNING" in x for x in lines), lines
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all("text" in r["samples"][0] for r in rows) and images[1].id not in {r["id"] for r in rows}
