"""`lumo codec fit-kmeans`: k-means on Ray over an embeddings folder: deterministic for a seed, within 1 %
of scikit-learn's inertia with the same seed budget, the codebook saved with its digest."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lumo_ray.cli import main
from lumo_ray.embed import kmeans as K
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


def test_kmeans_is_deterministic_and_matches_scikit_learn(tmp_path, ray_local):
    from sklearn.cluster import KMeans

    X = blob_embeddings(tmp_path / "emb")
    args = ["codec", "fit-kmeans", "--embeddings", str(tmp_path / "emb"), "--k", "12", "--seed", "0", "--n-init", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "codebook.npy").read_bytes()
    assert a == (tmp_path / "b" / "codebook.npy").read_bytes()  # the same seed, the same bytes
    centres, doc = K.load_codebook(tmp_path / "a")
    assert centres.shape == (12, 24) and doc["rows"] == len(X) and doc["n_init"] == 3
    ref = KMeans(12, n_init=3, random_state=0).fit(X).inertia_
    assert abs(doc["inertia"] - ref) / ref < 0.01, (doc["inertia"], ref)
    # the recorded inertia is the codebook's: recomputed from the rows
    d = K.sq_dists(X, centres)
    assert d.min(1).sum() == pytest.approx(doc["inertia"], rel=1e-5)
    # the 1 % check can fail: twelve rows taken as the codebook, without Lloyd iterations, miss it
    assert K.sq_dists(X, X[:12]).min(1).sum() > ref * 1.01


def test_a_changed_codebook_is_refused(tmp_path, ray_local):
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
