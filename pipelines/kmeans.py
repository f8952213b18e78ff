"""`lumo codec fit-kmeans`: a k-means codebook over an embeddings folder (`lumo data embed`), fitted on
Ray: each Lloyd iteration is one Ray Data pass in which a task per Parquet part computes its rows'
assignments and partial sums against the current centres; the driver sums the partials in part order
and moves the centres (lumo_ray/embed/kmeans.py). The initialisation (seeded greedy k-means++) runs on
the driver over a seeded sample of at most `--init-sample` rows. `--n-init N` fits from N seeds
(seed, seed + 1, ...) and keeps the lowest inertia, as scikit-learn's n_init.
"""
from __future__ import annotations

import time

import numpy as np
import ray

from lumo_ray.embed import kmeans as K
from lumo_ray.embed.parts import read_part, verified_index
from lumo_ray.storage import PathLike, locate
from pipelines.ray_env import init_ray


def _partials(batch: dict, root: str, column: str, centers: np.ndarray) -> dict:
    out = {"name": [], "sums": [], "counts": [], "inertia": []}
    for name, sha in zip(batch["name"], batch["sha256"]):
        s, c, i = K.partial(read_part(locate(root), name, sha, column), centers)
        out["name"].append(name)
        out["sums"].append(s.tobytes())
        out["counts"].append(c.tobytes())
        out["inertia"].append(i)
    return out


def fit_kmeans(embeddings: PathLike, k: int, out_dir: PathLike, seed: int = 0, column: str = "image",
               max_iter: int = 50, tol: float = 1e-4, n_init: int = 1, init_sample: int = 65536,
               address: str | None = None, log=print) -> dict:
    root, out = locate(embeddings), locate(out_dir)
    index = verified_index(root)
    parts = [p for p in index["parts"] if p["rows"]]
    names = [(p["name"], p["sha256"]) for p in parts]
    rows = sum(p["rows"] for p in index["parts"])
    if rows < k:
        from lumo_ray.errors import UserError
        raise UserError("embeddings", root, f"has {rows} rows, fewer than k={k}", "lower --k or embed more records")
    init_ray(address)
    ds = ray.data.from_items([{"name": n, "sha256": s} for n, s in names], override_num_blocks=len(names))
    dim = index["model"]["dim"]

    def run_pass(C: np.ndarray) -> list[tuple]:
        res = ds.map_batches(_partials, fn_kwargs={"root": str(root), "column": column, "centers": C},
                             batch_size=1, num_cpus=1).take_all()
        res.sort(key=lambda r: r["name"])  # part order: the float64 sums are the same every run
        return [(np.frombuffer(r["sums"], np.float64).reshape(C.shape), np.frombuffer(r["counts"], np.int64),
                 float(r["inertia"])) for r in res]

    sample = init_rows(root, parts, column, init_sample, seed, dim)
    log(f"[kmeans] {rows} rows x {dim} ({column}) in {len(names)} parts, k={k}, seed {seed}, n_init {n_init}, "
        f"k-means++ on {len(sample)} rows")
    t0, best = time.time(), None
    for s in range(seed, seed + n_init):
        res = K.fit(sample, k, s, run_pass, max_iter, tol, log)
        log(f"[kmeans] seed {s}: inertia {res.inertia:.6g} after {res.iterations} iterations ({time.time() - t0:.1f}s)")
        if best is None or res.inertia < best[1].inertia:
            best = (s, res)
    s, res = best
    doc = K.save_codebook(out, res, {"column": column, "seed": s, "n_init": n_init, "tol": tol, "max_iter": max_iter,
                                     "embeddings": {"path": str(root), "model": index["model"],
                                                    "index_sha256": index["sha256"]}})
    log(f"[kmeans] codebook {k} x {dim} (seed {s}, inertia {res.inertia:.6g}) -> {out / 'codebook.npy'} "
        f"(sha256 {doc['sha256'][:12]}), {time.time() - t0:.1f}s")
    return doc


def init_rows(root, parts: list[dict], column: str, limit: int, seed: int, dim: int) -> np.ndarray:
    """All rows when there are at most `limit`, else a seeded sample of `limit` of them (read part by
    part: the whole set is never in memory)."""
    total = sum(p["rows"] for p in parts)
    pick = np.arange(total) if total <= limit else np.sort(np.random.default_rng([seed, 7]).choice(total, limit, replace=False))
    out, start = [], 0
    for p in parts:
        sel = pick[(pick >= start) & (pick < start + p["rows"])] - start
        if len(sel):
            out.append(read_part(root, p["name"], p["sha256"], column)[sel])
        start += p["rows"]
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)
