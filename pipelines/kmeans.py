"""`lumo codec fit-kmeans`: a k-means codebook over an embeddings folder (`lumo data embed`). The
initialisation (seeded greedy k-means++) runs here over a seeded sample of at most `--init-sample`
vectors; then Lloyd iterations (lumo_ray/codecs/kmeans.py) by one of two engines, chosen by size:
- in-process (the embeddings fit `codec_kmeans.in_process_max_bytes`): the parts are read once into
  memory and each iteration's E-step runs part by part here (lumo_ray/embed/kmeans_local.py); Ray is
  not started.
- ray-data (they do not): each iteration is one Ray Data pass in which a task per Parquet part computes
  its rows' assignments and partial sums against the current centres.
Either way the driver sums the partials in part order and moves the centres, so a seed gives the same
codebook. `--n-init N` fits from N seeds (seed, seed + 1, ...) and keeps the lowest inertia, as
scikit-learn's n_init.
"""
from __future__ import annotations

import time
from contextlib import ExitStack

import numpy as np

from lumo_ray.config import KMeansFitConfig
from lumo_ray.codecs import kmeans as K
from lumo_ray.embed import kmeans_local as L
from lumo_ray.embed.parts import read_part, verified_index
from lumo_ray.storage import PathLike, locate


def _partials(batch: dict, root: str, column: str, centers: np.ndarray) -> dict:
    out = {"name": [], "sums": [], "counts": [], "inertia": []}
    for name, sha in zip(batch["name"], batch["sha256"]):
        s, c, i = K.partial(read_part(locate(root), name, sha, column), centers)
        out["name"].append(name)
        out["sums"].append(s.tobytes())
        out["counts"].append(c.tobytes())
        out["inertia"].append(i)
    return out


def ray_pass(root, parts: list[dict], column: str, address: str | None):
    """run_pass on Ray Data: one task per part, the partials back in part (index) order."""
    import ray  # here, not at the top: the in-process engine never imports or starts Ray

    from pipelines.ray_env import init_ray

    init_ray(address)
    order = {p["name"]: i for i, p in enumerate(parts)}
    ds = ray.data.from_items([{"name": p["name"], "sha256": p["sha256"]} for p in parts],
                             override_num_blocks=len(parts))

    def run_pass(C: np.ndarray) -> list[tuple]:
        res = ds.map_batches(_partials, fn_kwargs={"root": str(root), "column": column, "centers": C},
                             batch_size=1, num_cpus=1).take_all()
        res.sort(key=lambda r: order[r["name"]])  # part order: the float64 sums are the same every run
        return [(np.frombuffer(r["sums"], np.float64).reshape(C.shape), np.frombuffer(r["counts"], np.int64),
                 float(r["inertia"])) for r in res]

    return run_pass


def fit_kmeans(embeddings: PathLike, k: int, out_dir: PathLike, seed: int = 0, column: str = "image",
               max_iter: int = 50, tol: float = 1e-4, n_init: int = 1, init_sample: int = 65536,
               address: str | None = None, in_process_max_bytes: int | None = None, log=print) -> dict:
    """in_process_max_bytes: None = codec_kmeans.in_process_max_bytes's default."""
    from lumo_ray.errors import UserError

    if in_process_max_bytes is None:
        in_process_max_bytes = KMeansFitConfig().in_process_max_bytes
    if in_process_max_bytes < 0:
        raise UserError("codec_kmeans.in_process_max_bytes", in_process_max_bytes, "is negative",
                        "give 0 (always Ray Data) or the most bytes to fit in this process")
    root, out = locate(embeddings), locate(out_dir)
    index = verified_index(root)
    parts = [p for p in index["parts"] if p["rows"]]
    rows = sum(L.part_vectors(index, p, column) for p in parts)
    if rows < k:
        raise UserError("embeddings", root, f"has {rows} {column} vectors, fewer than k={k}",
                        "lower --k or embed more records")
    dim = index["model"]["dim"]
    engine, why = L.choose_engine(L.embedding_bytes(index, column), in_process_max_bytes)
    log(f"[kmeans] engine: {engine} ({why})")
    t0 = time.time()
    with ExitStack() as stack:
        if engine == "in-process":
            X, bounds = L.read_rows(root, parts, column, dim)
            run_pass = stack.enter_context(L.local_pass(X, bounds))
            sample = X[K.sample_index(len(X), init_sample, seed)]
        else:
            run_pass = ray_pass(root, parts, column, address)
            sample = init_rows(root, index, parts, column, init_sample, seed)
            stack.enter_context(L.one_blas_thread())  # the driver's k-means++
        log(f"[kmeans] {rows} vectors x {dim} ({column}) in {len(parts)} parts, k={k}, seed {seed}, "
            f"n_init {n_init}, k-means++ on {len(sample)} vectors")
        best = None
        for s in range(seed, seed + n_init):
            res = K.fit(sample, k, s, run_pass, max_iter, tol, log)
            log(f"[kmeans] seed {s}: inertia {res.inertia:.6g} after {res.iterations} iterations "
                f"({time.time() - t0:.1f}s)")
            if best is None or res.inertia < best[1].inertia:
                best = (s, res)
    s, res = best
    doc = K.save_codebook(out, res, {"column": column, "seed": s, "n_init": n_init, "tol": tol, "max_iter": max_iter,
                                     "engine": {"name": engine, "why": why},
                                     "embeddings": {"path": str(root), "model": index["model"],
                                                    "index_sha256": index["sha256"]}})
    log(f"[kmeans] codebook {k} x {dim} (seed {s}, inertia {res.inertia:.6g}) -> {out / 'codebook.npy'} "
        f"(sha256 {doc['sha256'][:12]}), {time.time() - t0:.1f}s")
    return doc


def init_rows(root, index: dict, parts: list[dict], column: str, limit: int, seed: int) -> np.ndarray:
    """The k-means++ sample (kmeans.sample_index over all vectors), read part by part: the whole set is
    never in memory."""
    sizes = [L.part_vectors(index, p, column) for p in parts]
    pick = K.sample_index(sum(sizes), limit, seed)
    out, start = [], 0
    for p, n in zip(parts, sizes):
        sel = pick[(pick >= start) & (pick < start + n)] - start
        if len(sel):
            out.append(read_part(root, p["name"], p["sha256"], column)[sel])
        start += n
    return np.concatenate(out) if out else np.zeros((0, index["model"]["dim"]), np.float32)
