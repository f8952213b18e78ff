"""k-means over embeddings (library, no Ray), the codebooks of the clip_kmeans image tokenizer (image_clip.py):
seeded greedy k-means++ on a sample, then Lloyd iterations whose E-step is a pass over the data in parts
(`run_pass(centers)` -> each part's partial sums, counts and inertia, in part order). pipelines/kmeans.py
runs the pass in this process over the parts held in memory (embed/kmeans_local.py) when they fit, else on
Ray Data. Partials are float64 and summed
in part order, so a seed gives the same codebook whatever ran the pass.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

FORMAT = "lumo-kmeans-codebook-v1"


def sq_dists(X: np.ndarray, C: np.ndarray, xx: np.ndarray | None = None, cc: np.ndarray | None = None,
             dtype=np.float64) -> np.ndarray:
    """[n, k] squared euclidean distances, in float64 unless told (xx, cc: the rows' squared norms, when
    known). Computed in place in one [n, k] buffer: |x|^2 - 2 x.c + |c|^2, the same floats as written out."""
    X, C = X.astype(dtype, copy=False), C.astype(dtype, copy=False)
    d = X @ C.T
    d *= -2.0
    d += ((X * X).sum(1) if xx is None else xx)[:, None]
    d += ((C * C).sum(1) if cc is None else cc)[None, :]
    return np.maximum(d, 0.0, out=d)


def assign(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """The nearest codeword of each row (ties: the lowest index)."""
    return sq_dists(X, C).argmin(1)


def partial(X: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One part's E-step: per-centre sums of its rows (float64), counts, and its inertia. Each row goes
    to the lowest float32 score |c|^2 - 2 x.c (as scikit-learn on float32 rows: half the float64
    matmul's time, the [n, k] pass being most of an iteration); the inertia is each row's own squared
    distance to its centre, in float64."""
    C32 = C.astype(np.float32)
    score = X.astype(np.float32, copy=False) @ (-2.0 * C32).T  # x 2: exact, so no pass of its own
    score += (C32 * C32).sum(1)
    lab = score.argmin(1)
    X64 = X.astype(np.float64)
    diff = X64 - C.astype(np.float64, copy=False)[lab]
    sums = np.zeros(C.shape, np.float64)
    np.add.at(sums, lab, X64)
    return sums, np.bincount(lab, minlength=len(C)).astype(np.int64), float((diff * diff).sum())


def kmeans_pp(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ (as scikit-learn: 2 + ln k candidates per centre, the one that lowers the
    potential most is kept), seeded."""
    if len(X) < k:
        raise ValueError(f"k-means: {len(X)} rows, fewer than k={k}")
    rng = np.random.default_rng(seed)
    # distances in float32 (as scikit-learn's on float32 rows: each centre reads the whole sample, half
    # the bytes of float64), their running sums in float64
    X = np.ascontiguousarray(X, np.float32)
    xx = (X * X).sum(1)  # once, not once per centre
    trials = 2 + int(math.log(k))
    chosen = [int(rng.integers(len(X)))]
    closest = sq_dists(X, X[chosen], xx, xx[chosen], np.float32)[:, 0]
    for _ in range(1, k):
        cum = np.cumsum(closest, dtype=np.float64)
        cand = np.searchsorted(cum, rng.random(trials) * cum[-1])
        cand = np.minimum(cand, len(X) - 1)
        d = sq_dists(X[cand], X, xx[cand], xx, np.float32)  # [trials, n]
        np.minimum(d, closest[None, :], out=d)
        best = int(d.sum(1, dtype=np.float64).argmin())
        chosen.append(int(cand[best]))
        closest = d[best]
    return X[chosen].astype(np.float64)


def sample_index(total: int, limit: int, seed: int) -> np.ndarray:
    """Which of `total` rows the k-means++ initialisation runs on: all when at most `limit`, else a
    seeded sample of `limit` (sorted). Both engines take this one, so a seed starts from the same centres."""
    if total <= limit:
        return np.arange(total)
    return np.sort(np.random.default_rng([seed, 7]).choice(total, limit, replace=False))


@dataclass
class KMeansResult:
    centers: np.ndarray  # [k, d] float32
    inertia: float
    iterations: int
    history: list[float] = field(default_factory=list)
    rows: int = 0


def fit(sample: np.ndarray, k: int, seed: int, run_pass: Callable[[np.ndarray], list[tuple]], max_iter: int = 50,
        tol: float = 1e-4, log: Callable[[str], None] = lambda s: None) -> KMeansResult:
    """Lloyd's algorithm from k-means++ on `sample`; stops when no centre moves more than tol x the data's
    mean variance per dimension (scikit-learn's rule) or after max_iter passes. A centre that gets no
    rows keeps its place."""
    C = kmeans_pp(sample, k, seed)
    scale = float(np.var(sample.astype(np.float64), axis=0).mean()) * tol
    history, rows, it = [], 0, 0
    for it in range(1, max_iter + 1):
        sums, counts, inertia = reduce_partials(run_pass(C), C.shape)
        rows = int(counts.sum())
        history.append(inertia)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C)
        shift = float(((new - C) ** 2).sum())
        C = new
        log(f"[kmeans] iteration {it}: inertia {inertia:.6g}, centre shift {shift:.3g}")
        if shift <= scale:
            break
    _, _, inertia = reduce_partials(run_pass(C), C.shape)  # the final centres' own inertia
    return KMeansResult(C.astype(np.float32), inertia, it, history + [inertia], rows)


def reduce_partials(partials: list[tuple], shape: tuple) -> tuple[np.ndarray, np.ndarray, float]:
    """Sum the parts' partials in the order given (part order: the same float64 sums every run)."""
    sums, counts, inertia = np.zeros(shape, np.float64), np.zeros(shape[0], np.int64), 0.0
    for s, c, i in partials:
        sums += s
        counts += c
        inertia += i
    return sums, counts, inertia


def codebook_bytes(centers: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(centers, np.float32), allow_pickle=False)
    return buf.getvalue()


def save_codebook(out, res: KMeansResult, meta: dict) -> dict:
    """<out>/codebook.npy and codebook.json (its sha256 is the codebook's digest)."""
    from ..storage import locate

    out = locate(out)
    data = codebook_bytes(res.centers)
    doc = {"format": FORMAT, "k": int(res.centers.shape[0]), "dim": int(res.centers.shape[1]),
           "sha256": hashlib.sha256(data).hexdigest(), "inertia": res.inertia, "iterations": res.iterations,
           "history": res.history, "rows": res.rows, **meta}
    (out / "codebook.npy").write_atomic(data)
    (out / "codebook.json").write_atomic(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def load_codebook(path) -> tuple[np.ndarray, dict]:
    """(centres [k, d] float32, codebook.json), refusing a codebook.npy whose sha256 is not recorded."""
    from ..errors import UserError
    from ..storage import locate

    root = locate(path)
    if not (root / "codebook.json").exists():
        raise UserError("codebook", root, "has no codebook.json", "run `lumo codec fit-kmeans` into it")
    doc = json.loads((root / "codebook.json").read_text())
    data = (root / "codebook.npy").read_bytes()
    if hashlib.sha256(data).hexdigest() != doc.get("sha256"):
        raise UserError("codebook", root / "codebook.npy", "sha256 does not match codebook.json",
                        "it changed after fit-kmeans wrote it; fit again")
    return np.load(io.BytesIO(data), allow_pickle=False), doc
