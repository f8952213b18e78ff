"""`lumo codec fit-kmeans`: k-means over an embeddings folder, in this process when it fits
codec_kmeans.in_process_max_bytes, else on Ray Data: deterministic for a seed, within 1 % of
scikit-learn's inertia with the same seed budget, both engines within 1 % of each other, the codebook
saved with its digest."""
from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from lumo_ray.cli import main
from lumo_ray.codecs import kmeans as K
from lumo_ray.embed.parts import finish, write_part
from lumo_ray.storage import locate


def blob_embeddings(out, n_centres=12, per=150, dim=24, noise=0.45, seed=0) -> np.ndarray:
    """Unit vectors around random centres, written as an embeddings folder of 6 train parts."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim))
    X = np.concatenate([c + noise * rng.normal(size=(per, dim)) for c in centres])
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)[rng.permutation(n_centres * per)]
    out = locate(out)
    stats = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(X)), 6)):
        ids = [f"x:{j:05d}" for j in chunk]
        stats[("train", i)] = write_part(out, ("train", i), ids, X[chunk], X[chunk], [], "d")
    finish(out, stats, [], {"name": "synthetic", "identity": "0" * 64, "dim": dim}, "d")
    return X


def test_kmeans_is_deterministic_and_matches_scikit_learn(tmp_path):
    from sklearn.cluster import KMeans

    X = blob_embeddings(tmp_path / "emb")
    args = ["codec", "fit-kmeans", "--embeddings", str(tmp_path / "emb"), "--k", "12", "--seed", "0", "--n-init", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "codebook.npy").read_bytes()
    assert a == (tmp_path / "b" / "codebook.npy").read_bytes()  # the same seed, the same bytes
    centres, doc = K.load_codebook(tmp_path / "a")
    assert doc["engine"]["name"] == "in-process"  # 169 KiB of embeddings: far under the 2 GiB default
    assert centres.shape == (12, 24) and doc["rows"] == len(X) and doc["n_init"] == 3
    ref = KMeans(12, n_init=3, random_state=0).fit(X).inertia_
    assert abs(doc["inertia"] - ref) / ref < 0.01, (doc["inertia"], ref)
    # the recorded inertia is the codebook's: recomputed from the rows
    d = K.sq_dists(X, centres)
    assert d.min(1).sum() == pytest.approx(doc["inertia"], rel=1e-5)
    # the 1 % check can fail: twelve rows taken as the codebook, without Lloyd iterations, miss it
    assert K.sq_dists(X, X[:12]).min(1).sum() > ref * 1.01


def test_a_changed_codebook_is_refused(tmp_path):
    from lumo_ray.errors import UserError

    blob_embeddings(tmp_path / "emb", n_centres=4, per=20)
    assert main(["codec", "fit-kmeans", "--embeddings", str(tmp_path / "emb"), "--k", "4", "--out", str(tmp_path / "cb")]) == 0
    doc = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    assert doc["embeddings"]["index_sha256"] and doc["k"] == 4
    b = bytearray((tmp_path / "cb" / "codebook.npy").read_bytes())
    b[-1] ^= 1
    (tmp_path / "cb" / "codebook.npy").write_bytes(bytes(b))
    with pytest.raises(UserError, match="sha256 does not match codebook.json"):
        K.load_codebook(tmp_path / "cb")
    assert main(["codec", "fit-kmeans", "--embeddings", str(tmp_path / "emb"), "--k", "500", "--out", str(tmp_path / "x")]) == 2


def test_ray_data_engine_below_the_limit_reaches_the_same_inertia(tmp_path, ray_local, capsys):
    blob_embeddings(tmp_path / "emb", n_centres=8, per=60, dim=16)
    args = ["codec", "fit-kmeans", "--embeddings", str(tmp_path / "emb"), "--k", "8", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "local")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray"), "--set", "codec_kmeans.in_process_max_bytes=1024"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "[kmeans] engine:" in ln]
    assert lines[0].startswith("[kmeans] engine: in-process (embeddings 30.0 KiB <= ") and len(lines) == 2
    assert lines[1].startswith("[kmeans] engine: ray-data (embeddings 30.0 KiB > codec_kmeans.in_process_max_bytes 1.0 KiB")
    local, ray_ = (K.load_codebook(tmp_path / d)[1] for d in ("local", "ray"))
    assert (local["engine"]["name"], ray_["engine"]["name"]) == ("in-process", "ray-data")
    assert ray_["rows"] == local["rows"] == 480 and ray_["k"] == 8
    assert abs(ray_["inertia"] - local["inertia"]) / local["inertia"] < 0.01, (ray_["inertia"], local["inertia"])
    # same sample, init, part order and one-threaded BLAS per part: here the very same bytes
    assert ray_["sha256"] == local["sha256"]
    assert main(args + ["--out", str(tmp_path / "x"), "--set", "codec_kmeans.in_process_max_bytes=-1"]) == 2
    assert "codec_kmeans.in_process_max_bytes" in capsys.readouterr().err


def test_in_process_engine_never_imports_ray(tmp_path):
    blob_embeddings(tmp_path / "emb", n_centres=4, per=20)
    code = ("import sys; from pipelines.kmeans import fit_kmeans; "
            f"fit_kmeans({str(tmp_path / 'emb')!r}, 4, {str(tmp_path / 'cb')!r}, log=lambda s: None); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
