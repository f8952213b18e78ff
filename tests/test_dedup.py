"""`lumo data dedup`: exact duplicates by content hash, planted near-duplicates (resized, re-encoded as
JPEG, shifted by 2 px) found by CLIP cosine at the default threshold without dropping a distinct image, every drop
recorded; the caption-image agreement filter drops below its threshold, with the score."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lumo_ray.cli import main
from lumo_ray.data.manifest import Record, read_manifest, write_manifest
from lumo_ray.data.probe import probe_image
from lumo_ray.embed.clip_train import shift

N, PLANTED = 100, 20


def grid(i: int) -> Image.Image:
    """A distinct image: a 6 x 6 grid of random colours, 96 x 96."""
    r = np.random.default_rng([i, 1])
    return Image.fromarray(r.integers(0, 256, (6, 6, 3)).astype(np.uint8)).resize((96, 96), Image.NEAREST)


def jpeg(im: Image.Image) -> Image.Image:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=75)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def curated(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("dedup")
    files = {f"d{i:03d}": grid(i) for i in range(N)}
    files.update({f"r{i:03d}": grid(i).resize((72, 72), Image.BICUBIC) for i in range(PLANTED)})  # resized
    files.update({f"j{i:03d}": jpeg(grid(PLANTED + i)) for i in range(PLANTED)})  # re-encoded
    files.update({f"s{i:03d}": shift(grid(2 * PLANTED + i), 2, -2) for i in range(PLANTED)})  # shifted 2 %
    recs = []
    for rid, im in files.items():
        im.save(d / f"{rid}.png")
        recs.append(Record(id=rid, source="synth", group=rid, task="i2t", modalities={"image": {"path": str(d / f"{rid}.png")}},
                           text={"prompt": "", "caption": f"picture {rid}"}, split="train",
                           meta={"probe": {"image": probe_image(d / f"{rid}.png")}}))
    for i in range(5):  # the same bytes under another name and id
        shutil.copy(d / f"d{90 + i:03d}.png", d / f"c{i:03d}.png")
        recs.append(Record(id=f"c{i:03d}", source="synth", group=f"c{i:03d}", task="i2t",
                           modalities={"image": {"path": str(d / f"c{i:03d}.png")}}, text={"prompt": "", "caption": "copy"},
                           split="train", meta={"probe": {"image": probe_image(d / f"c{i:03d}.png")}}))
    write_manifest(recs, d / "manifest.jsonl")
    assert main(["data", "embed", "--manifest", str(d / "manifest.jsonl"), "--out", str(d / "emb")]) == 0
    assert main(["data", "dedup", "--embeddings", str(d / "emb"), "--manifest", str(d / "manifest.jsonl"),
                 "--out", str(d / "out")]) == 0
    return d


def test_planted_duplicates_are_found_and_no_distinct_image_is_dropped(curated):
    d = curated
    groups = [json.loads(x) for x in (d / "out" / "duplicates.jsonl").read_text().splitlines()]
    pairs = {(g["kept"], x) for g in groups for x in g["dropped"]}
    planted = ({(f"d{i:03d}", f"r{i:03d}") for i in range(PLANTED)} | {(f"d{PLANTED + i:03d}", f"j{i:03d}") for i in range(PLANTED)}
               | {(f"d{2 * PLANTED + i:03d}", f"s{i:03d}") for i in range(PLANTED)})
    found = planted & pairs
    near = {(g["kept"], x) for g in groups if g["kind"] == "near" for x in g["dropped"]}
    recall, precision = len(found) / len(planted), len(found) / max(1, len(near))
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    kept = {r.id for r in read_manifest(d / "out" / "manifest.jsonl")[0]}
    # no distinct image dropped (d090..d094 leave as exact copies of c000..c004, which stay)
    assert {f"d{i:03d}" for i in range(N) if not 90 <= i < 95} | {f"c{i:03d}" for i in range(5)} <= kept
    exact = [g for g in groups if g["kind"] == "exact"]
    assert sorted((g["kept"], g["dropped"]) for g in exact) == [(f"c{i:03d}", [f"d{90 + i:03d}"]) for i in range(5)]
    errs = [json.loads(x) for x in (d / "out" / "errors.jsonl").read_text().splitlines()]
    assert len(errs) == sum(len(g["dropped"]) for g in groups) and all(e["stage"] == "dedup" for e in errs)
    assert any("cosine" in e["detail"] for e in errs) and any("same image bytes" in e["detail"] for e in errs)
    s = json.loads((d / "out" / "summary.json").read_text())
    assert s["kept"] + len(errs) == s["records"] == N + 3 * PLANTED + 5


def test_clip_score_filter_drops_below_its_threshold_with_the_score(curated, tmp_path):
    from lumo_ray.embed.dedup import curate
    from lumo_ray.embed.parts import read_embeddings

    e = read_embeddings(curated / "emb")
    scores = (e.image * e.text).sum(1)
    cut = float(np.median(scores))
    cur = curate(e.ids, e.image, e.text, {}, threshold=2.0, min_clip_score=cut)  # near-dup removal off
    low = {x["id"]: x["score"] for x in cur.low_score}
    assert set(low) == {i for i, s in zip(e.ids, scores) if s < cut} and all(s < cut for s in low.values())
    assert set(cur.keep) == set(e.ids) - set(low) and not cur.groups
    rc = main(["data", "dedup", "--embeddings", str(curated / "emb"), "--manifest", str(curated / "manifest.jsonl"),
               "--out", str(tmp_path / "f"), "--threshold", "2", "--min-clip-score", str(cut)])
    errs = [json.loads(x) for x in (tmp_path / "f" / "errors.jsonl").read_text().splitlines()]
    exact = {f"d{90 + i:03d}" for i in range(5)}  # the CLI drops exact copies first (by the manifest's hashes)
    assert rc == 0 and {x["id"] for x in errs if x["reason"] == "low clip score"} == set(low) - exact
    assert {x["id"] for x in errs if x["reason"] == "exact duplicate"} == exact
    assert all(float(x["detail"].split()[2]) < cut for x in errs if x["reason"] == "low clip score")


def test_records_of_one_item_are_not_duplicates_of_each_other():
    """Two captions of one item (one manifest group, the same image bytes) both stay; the same image
    under another item goes, as an exact duplicate; a near copy under another item goes too."""
    from lumo_ray.embed.dedup import curate

    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 16)).astype(np.float32)
    X[1], X[2] = X[0], X[0]
    X[4] = X[3] + 0.01 * rng.normal(size=16)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ids = ["a1", "a2", "b", "c", "d", "e"]
    group = {"a1": "a", "a2": "a", "b": "b", "c": "c", "d": "d", "e": "e"}
    hashes = {"a1": "h", "a2": "h", "b": "h"}
    cur = curate(ids, X, X, hashes, group=group)
    assert cur.keep == ["a1", "a2", "c", "e"]
    assert [(g["kind"], g["kept"], g["dropped"]) for g in cur.groups] == [("exact", "a1", ["b"]), ("near", "c", ["d"])]


@pytest.mark.parametrize("trained", [True, False])
def test_clip_score_filter_drops_mismatched_captions_of_synthetic_scenes(trained):
    """Held-out synthetic scenes, half with their own caption and half with another scene's (a different
    one): at 0.05 (below the trained preset's matched scores, measured >= 0.09, above most mismatched
    ones) the trained preset keeps >= 95 % of the matched pairs and drops >= 70 % of the mismatched; the
    random init, whose scores mean nothing, does not."""
    from lumo_ray.codecs.clip import tiny_clip
    from lumo_ray.embed.clip_train import _synth_scene
    from lumo_ray.embed.dedup import curate

    clip = tiny_clip(0, trained=trained)
    rng = np.random.default_rng([5, 9])
    scenes = [_synth_scene(rng) for _ in range(200)]
    caps = [c for _, c in scenes]
    given = [caps[i] if i % 2 == 0 else next(c for c in caps[i + 1:] + caps if c != caps[i]) for i in range(200)]
    ids = [f"x{i:03d}" for i in range(200)]
    cur = curate(ids, clip.embed_images([clip.pixels(im) for im, _ in scenes]), clip.embed_texts(given), {},
                 threshold=2.0, min_clip_score=0.05)
    kept = set(cur.keep)
    matched_kept = np.mean([ids[i] in kept for i in range(0, 200, 2)])
    mismatched_dropped = np.mean([ids[i] not in kept for i in range(1, 200, 2)])
    assert (matched_kept >= 0.95 and mismatched_dropped >= 0.7) == trained, (matched_kept, mismatched_dropped)
