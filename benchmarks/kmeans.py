"""`lumo codec fit-kmeans` beside scikit-learn's KMeans on the same rows: the library call (the engine
its size picks: in-process under codec_kmeans.in_process_max_bytes), the whole command in a fresh
process (interpreter, imports, reading the parts, the fit, the files), scikit-learn's fit; with
--ray, also the Ray Data engine once (the limit set to 0). Times and inertias side by side.

    python -m benchmarks.kmeans [--rows 100000] [--k 256] [--repeat 3] [--ray] [--out DIR]

The rows: curation.py's synthetic unit vectors (64-d, clusters of 50 rows), 5,000 a part. scikit-learn:
KMeans(k, n_init=1, random_state=0) on the float32 array in memory (k-means++ on every row; ours on a
seeded sample of at most 65,536). The three measures take turns, --repeat rounds (a shared machine's
load moves under one long run); each time is the fastest and the median of its rounds. Prints a table
and the load average at each round.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"  # 1-minute average


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the three measures")
    ap.add_argument("--ray", action="store_true", help="also time the Ray Data engine (limit 0), once")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from sklearn.cluster import KMeans

    from benchmarks.curation import vectors
    from lumo_ray.codecs.kmeans import load_codebook
    from pipelines.kmeans import fit_kmeans

    root = Path(a.out or tempfile.mkdtemp(prefix="lumo-kmeans-"))
    X = vectors(root / "vec", a.rows)
    quiet = lambda *x, **k: None  # noqa: E731
    shape = f"k={a.k}, {a.rows:,} x {X.shape[1]}"
    times, info, loads = {}, {}, []

    def timed(name: str, fn) -> None:
        t0 = time.time()
        info[name] = fn()
        times.setdefault(name, []).append(time.time() - t0)

    def ours(label: str, **kw):
        doc = fit_kmeans(root / "vec", a.k, root / f"cb-{label}", log=quiet, **kw)
        return doc["iterations"], f"{doc['inertia']:.1f}", doc["sha256"][:12]

    def cli():
        subprocess.run([sys.executable, "-m", "lumo_ray.cli", "codec", "fit-kmeans", "--embeddings", str(root / "vec"),
                        "--k", str(a.k), "--out", str(root / "cb-cli")], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        doc = load_codebook(root / "cb-cli")[1]
        return doc["iterations"], f"{doc['inertia']:.1f}", doc["sha256"][:12]

    def sklearn():
        sk = KMeans(a.k, n_init=1, random_state=0).fit(X)
        return sk.n_iter_, f"{sk.inertia_:.1f}", "-"

    lib = f"{shape}: fit_kmeans, in-process engine (library call)"
    whole = f"{shape}: `lumo codec fit-kmeans` (whole command, fresh process)"
    sk = f"{shape}: scikit-learn KMeans(n_init=1).fit"
    for _ in range(a.repeat):
        loads.append(load())
        timed(lib, lambda: ours("local"))
        timed(whole, cli)
        timed(sk, sklearn)
    if a.ray:
        timed(f"{shape}: fit_kmeans, ray-data engine (library call, Ray start-up included)",
              lambda: ours("ray", in_process_max_bytes=0))
    loads.append(load())
    print(f"# {platform.machine()}, {os.cpu_count()} cores; {a.repeat} rounds; load (1 min) at each round: {' -> '.join(loads)}")
    print("| measure | fastest | median | iterations | inertia | codebook sha256 |\n|---|---|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.2f} s | {statistics.median(ts):.2f} s | " + " | ".join(str(x) for x in info[name]) + " |")
    for f, label in ((min, "fastest"), (statistics.median, "median")):
        print(f"lumo / scikit-learn ({label}): library call {f(times[lib]) / f(times[sk]):.2f}x, "
              f"whole command {f(times[whole]) / f(times[sk]):.2f}x")


if __name__ == "__main__":
    main()
