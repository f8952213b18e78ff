"""The in-process engine of `lumo codec fit-kmeans` (library, no Ray): when an embeddings folder fits
memory, its parts are read once into one array and each Lloyd E-step runs part by part in this process
(kmeans.partial over the same part boundaries, summed in the same part order as the Ray Data pass), so
a seed gives the codebook the Ray path gives, without starting Ray or scheduling a pass per iteration.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from ..codecs import kmeans as K
from .parts import read_part

# float32 vectors as the parts hold them (parts.column)
BYTES_PER_VALUE = 4


def part_vectors(index: dict, part: dict, column: str) -> int:
    """Vectors of `column` in one part: its rows, times the patches per image for `patches`."""
    return part["rows"] * (int(index["model"].get("patches") or 1) if column == "patches" else 1)


def embedding_bytes(index: dict, column: str) -> int:
    """Bytes of the whole column in memory (float32)."""
    return sum(part_vectors(index, p, column) for p in index["parts"]) * int(index["model"]["dim"]) * BYTES_PER_VALUE


def choose_engine(nbytes: int, limit: int) -> tuple[str, str]:
    """('in-process' | 'ray-data', why), the why one line naming the setting that decided it."""
    size = f"embeddings {human(nbytes)}"
    setting = f"codec_kmeans.in_process_max_bytes {human(limit)}"
    if nbytes <= limit:
        return "in-process", f"{size} <= {setting}: Lloyd in this process, no Ray"
    return "ray-data", f"{size} > {setting}: one Ray Data pass over the parts per iteration"


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def read_rows(root, parts: list[dict], column: str, dim: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Every part's vectors in index order as one float32 array, and each part's [start, end) in it
    (each part checked against its sha256 as it is read)."""
    blocks = [read_part(root, p["name"], p["sha256"], column) for p in parts]
    ends = np.cumsum([len(b) for b in blocks]).tolist()
    X = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
    return X, [(a, b) for a, b in zip([0] + ends[:-1], ends) if b > a]


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread while open (as scikit-learn's Lloyd). A k-means matmul is thin (k-means++: a
    few candidates x the sample): a many-threaded BLAS gains little there and, on a machine busy with
    other work, stalls at every call waiting for its threads (10k rows: 0.9 s one-threaded, 6 s on 2
    threads at load 25). A Ray worker's BLAS is one-threaded too (OMP_NUM_THREADS=1)."""
    with threadpool_limits(1, user_api="blas"):
        yield


@contextmanager
def local_pass(X: np.ndarray, bounds: list[tuple[int, int]]) -> Iterator[Callable[[np.ndarray], list[tuple]]]:
    """run_pass for kmeans.fit while open: each part's partials against the centres, in part order, the
    parts spread over a thread per core (numpy leaves the GIL in the matmul and reductions) with BLAS
    on one thread each, as Ray Data spreads them over one-CPU tasks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(len(bounds), cores))
    with one_blas_thread(), ThreadPoolExecutor(workers, thread_name_prefix="kmeans") as pool:
        yield lambda C: list(pool.map(lambda ab: K.partial(X[ab[0]:ab[1]], C), bounds))
