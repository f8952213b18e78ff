"""Curation throughput: `lumo data embed` images/s (tiny CLIP, 1 and 2 actors), `lumo codec fit-kmeans`
time beside scikit-learn's KMeans on the same rows, and `lumo data dedup`'s near-duplicate pass time.

    python -m benchmarks.curation [--images 2048] [--rows 10000,100000] [--k 256] [--out DIR]

k-means and dedup run on synthetic unit vectors (64-d, as the tiny preset's) written as an embeddings
folder: clusters of 50 rows around random centres. One run per measure; prints a table.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def synth_manifest(root: Path, n: int) -> Path:
    from lumo_ray.data.manifest import Record, write_manifest
    from PIL import Image

    recs = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        r = np.random.default_rng([i, 3])
        p = root / "img" / f"{i:06d}.png"
        Image.fromarray(r.integers(0, 256, (6, 6, 3)).astype(np.uint8)).resize((96, 96), Image.NEAREST).save(p)
        recs.append(Record(id=f"im:{i:06d}", source="synth", group=f"im:{i:06d}", task="i2t",
                           modalities={"image": {"path": str(p)}}, text={"prompt": "", "caption": f"grid {i}"},
                           split="train"))
    write_manifest(recs, root / "manifest.jsonl")
    return root / "manifest.jsonl"


def vectors(out: Path, n: int, dim: int = 64, per: int = 50) -> np.ndarray:
    from lumo_ray.embed.parts import finish, write_part
    from lumo_ray.storage import locate

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(1, n // per), dim))
    X = centres[rng.integers(len(centres), size=n)] + 0.3 * rng.normal(size=(n, dim))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    stats, loc = {}, locate(out)
    for i, idx in enumerate(np.array_split(np.arange(n), max(1, n // 5000))):
        stats[("train", i)] = write_part(loc, ("train", i), [f"x:{j:07d}" for j in idx], X[idx], X[idx], [], "bench")
    finish(loc, stats, [], {"name": "synthetic", "identity": "0" * 64, "dim": dim}, "bench")
    return X


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--rows", default="10000,100000")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    from sklearn.cluster import KMeans

    from lumo_ray.config import LumoConfig, load_config
    from lumo_ray.embed.dedup import near_groups
    from pipelines.embed import run_embed
    from pipelines.kmeans import fit_kmeans

    root = Path(a.out or tempfile.mkdtemp(prefix="lumo-curation-"))
    quiet = lambda *x, **k: None  # noqa: E731
    rows = []
    manifest = synth_manifest(root / "imgs", a.images)
    cfg = load_config(LumoConfig, None, [])
    for actors in (1, 2):
        t0 = time.time()
        run_embed(manifest, cfg, root / f"emb{actors}", actors=actors, log=quiet)
        dt = time.time() - t0
        rows.append((f"embed {a.images} images, {actors} actor(s) (tiny CLIP, CPU; whole command)",
                     f"{a.images / dt:,.0f} images/s", f"{dt:.1f} s"))
    for n in [int(x) for x in a.rows.split(",")]:
        X = vectors(root / f"vec{n}", n)
        t0 = time.time()
        doc = fit_kmeans(root / f"vec{n}", a.k, root / f"cb{n}", log=quiet)
        ours = time.time() - t0
        t0 = time.time()
        sk = KMeans(a.k, n_init=1, random_state=0).fit(X)
        skt = time.time() - t0
        rows.append((f"k-means k={a.k}, {n:,} x 64 rows: fit-kmeans ({doc['engine']['name']} engine) vs scikit-learn",
                     f"{ours:.1f} s, {doc['iterations']} iterations, inertia {doc['inertia']:.1f}",
                     f"{skt:.1f} s, {sk.n_iter_} iterations, inertia {sk.inertia_:.1f}"))
        t0 = time.time()
        g = near_groups([f"x:{j:07d}" for j in range(n)], X, 0.95)
        rows.append((f"dedup near-duplicate pass, {n:,} x 64 rows (buckets of ~2048)",
                     f"{time.time() - t0:.1f} s", f"{sum(len(x['dropped']) for x in g):,} dropped"))
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads; one run each")
    print("| measure | lumo_ray | beside |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
