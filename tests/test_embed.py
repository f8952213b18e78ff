"""`lumo data embed`: CLIP embeddings on a Ray Data actor pool into Parquet parts: the same bytes for any
actor count, a re-run resumes, bad media recorded, records without an image counted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.manifest import Record, write_manifest
from lumo_ray.embed.parts import read_embeddings
from pipelines.embed import run_embed

CFG = ["data.embed.shard_size=5", "data.embed.batch_size=3"]


def quiet(*a, **k):
    pass


def cfg(*extra):
    return load_config(LumoConfig, None, CFG + list(extra))


def parts_bytes(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and (p.suffix == ".parquet" or p.name == "index.json")}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """14 images of coloured shapes (one file is not an image), an audio record, train and eval."""
    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("embed")
    recs = []
    for i in range(14):
        p = d / f"img{i:02d}.png"
        im = Image.new("RGB", (40 + i, 36), (20 * i % 255, 90, 200 - 10 * i))
        ImageDraw.Draw(im).ellipse((4, 4, 20 + i, 30), fill=(255 - 15 * i, 10 * i, 40))
        im.save(p)
        recs.append(Record(id=f"im:{i:02d}", source="synth", group=f"im:{i:02d}", task="i2t",
                           modalities={"image": {"path": str(p)}}, text={"prompt": "", "caption": f"shape number {i}"},
                           split="eval" if i % 5 == 0 else "train"))
    (d / "img13.png").write_bytes(b"not an image")
    recs.append(Record(id="au:00", source="synth", group="au:00", task="a2t", modalities={"audio": {"path": "x.wav"}},
                       text={"prompt": "", "caption": "a beep"}, split="train"))
    write_manifest(recs, d / "manifest.jsonl")
    return d / "manifest.jsonl"


@pytest.fixture(scope="module")
def one_actor(manifest, tmp_path_factory, ray_local):
    """One run with 1 actor and the default settings, which every test below reads and none changes:
    (its output dir, its summary)."""
    out = tmp_path_factory.mktemp("embed_one") / "e1"
    return out, run_embed(manifest, cfg(), out, actors=1, log=quiet)


def test_embeddings_are_unit_vectors_with_errors_recorded(one_actor):
    out, s = one_actor
    assert s["rows"] == 13 and s["errors"] == 1 and s["no_image"] == 1
    err = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert err[0]["id"] == "im:13" and err[0]["stage"] == "load" and "img13.png" in err[0]["detail"]
    e = read_embeddings(out)
    ev = [f"im:{i:02d}" for i in range(13) if i % 5 == 0]
    assert e.ids == ev + [f"im:{i:02d}" for i in range(13) if i % 5]  # parts in (split, index) order, ids in order
    assert e.splits == ["eval"] * len(ev) + ["train"] * (13 - len(ev))
    assert set(e.ids) == {f"im:{i:02d}" for i in range(13)} and e.image.shape == (13, 64) == e.text.shape
    assert np.allclose(np.linalg.norm(e.image, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(e.text, axis=1), 1, atol=1e-5)
    index = json.loads((out / "index.json").read_text())
    assert index["model"]["name"] == "tiny" and len(index["model"]["identity"]) == 64 and index["rows"] == 13


def test_actor_count_does_not_change_bytes_and_rerun_resumes(manifest, one_actor, tmp_path, ray_local):
    one, two = one_actor[0], tmp_path / "two"
    lines = []  # the 2 actors each ask for one of the session's 2 fake GPUs: Ray gives them, CUDA is absent
    run_embed(manifest, cfg("data.embed.num_gpus_per_actor=1"), two, actors=2, log=lines.append)
    placed = next(x for x in lines if x.startswith("[embed] embedding actors computed on: "))
    assert "Ray GPU ids none" not in placed and "cuda" not in placed  # (tests/test_gpu_requests.py: the rest)
    assert parts_bytes(one) == parts_bytes(two) and len(parts_bytes(one)) >= 4
    # interrupted: no index, one part gone, one truncated -> a re-run writes those two only, same bytes
    (two / "index.json").unlink()
    ps = sorted(two.rglob("*.parquet"))
    ps[0].unlink()
    ps[1].write_bytes(ps[1].read_bytes()[:50])
    lines = []
    run_embed(manifest, cfg(), two, actors=2, log=lines.append)
    n = len(ps)
    assert f"({n - 2} complete, 2 to write)" in next(x for x in lines if x.startswith("[embed] 15 records"))
    assert parts_bytes(one) == parts_bytes(two)


def test_a_changed_part_is_refused_by_the_reader(one_actor, tmp_path):
    from lumo_ray.errors import UserError

    shutil.copytree(one_actor[0], tmp_path / "bad")
    p = sorted((tmp_path / "bad").rglob("*.parquet"))[0]
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))
    with pytest.raises(UserError, match="sha256 does not match index.json"):
        read_embeddings(tmp_path / "bad")
