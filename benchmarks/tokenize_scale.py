"""Tokenize at dataset scale: records/s and the driver's peak memory as the manifest grows.

    python -m benchmarks.tokenize_scale [--sizes 1000,10000,100000,1000000] [--two-node 100000]

Each size runs `run_tokenize` (the tiny preset, `lumo data tokenize` defaults but one loader and one
tokenizer actor per core) on a synthetic text-only manifest (task `t`: one caption per record, ids
in order, every 20th record in eval), so the pipeline itself - plan, Ray Data, shard writing, the
index - dominates, not a codec. Each size is a fresh child process with its own local Ray: its
driver's peak resident memory (ru_maxrss) is the job's, with nothing carried over from a smaller
size. `--two-node N` also runs size N on a 2-node local cluster (ray.cluster_utils, one CPU per
node, one CPU per actor, so the loader and the tokenizer run on different nodes and every loaded
shard crosses between object stores) beside the 1-node run. The targets (issue 20): driver peak at 1M records <= 1.5 x at 10k;
records/s at 100k >= 0.8 x at 10k.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("a small dog runs across the wet grass near an old wooden fence while birds sing in the "
         "distance and the wind moves the tall trees").split()


def write_manifest(path: Path, n: int) -> None:
    """n text-only records, ids in sorted order (as `lumo data normalize` writes them), streamed to disk."""
    with open(path, "w") as fh:
        for i in range(n):
            words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 9)]
            fh.write(json.dumps({"id": f"rec{i:08d}", "source": "synthetic", "group": f"g{i // 4}", "task": "t",
                                 "modalities": {}, "text": {"prompt": "", "caption": " ".join(words)},
                                 "split": "eval" if i % 20 == 0 else "train", "meta": {}},
                                sort_keys=True, separators=(",", ":")) + "\n")


def child(n: int, nodes: int, work: Path, extra: list[str] = ()) -> dict:
    import ray

    from lumo_ray.config import LumoConfig, load_config
    from pipelines.tokenize import run_tokenize

    manifest = work / "manifest.jsonl"
    t0 = time.perf_counter()
    write_manifest(manifest, n)
    t_manifest = time.perf_counter() - t0
    cpus = os.cpu_count() or 2
    cluster = None
    if nodes == 1:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    else:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": max(1, cpus // nodes)})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=max(1, cpus // nodes))
        ray.init(address=cluster.address, log_to_driver=False)
    sets = [f"data.tokenize.actors={cpus // 2}", f"data.tokenize.loaders={cpus // 2}"]
    if nodes > 1:  # a whole CPU per actor: the loaders and the tokenizers land on different nodes
        sets += ["data.tokenize.num_cpus_per_actor=1", "data.tokenize.num_cpus_per_loader=1"]
    cfg = load_config(LumoConfig, None, sets + list(extra))  # --set: after the layout, so it wins
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    summary = run_tokenize(manifest, cfg, work / "shards", log=lambda *a: None)
    dt = time.perf_counter() - t0
    index = json.loads((work / "shards" / "index.json").read_text())
    assert summary["samples"] == n and summary["errors"] == 0, summary
    ray.shutdown()  # the driver first, then the nodes it ran on (a node gone first is "lost objects")
    if cluster is not None:
        cluster.shutdown()
    return {"records": n, "nodes": nodes, "seconds": round(dt, 1), "records_per_s": round(n / dt, 1),
            "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_mb_before_job": round(rss0, 1), "shards": index["totals"]["shards"],
            "shard_size": cfg.data.tokenize.shard_size, "manifest_mb": round(manifest.stat().st_size / 2**20, 1),
            "manifest_write_s": round(t_manifest, 1)}


def run_child(n: int, nodes: int, extra: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="lumo-scale-") as d:
        p = subprocess.run([sys.executable, "-m", "benchmarks.tokenize_scale", "--child", str(n), "--nodes", str(nodes),
                            "--work", d, *[f"--set={kv}" for kv in extra]], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"size {n} ({nodes} node(s)) failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--two-node", type=int, default=100000, help="also run this size on 2 local nodes (0: skip)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, e.g. data.tokenize.loaders=0 (repeatable)")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.nodes, Path(a.work), a.set)))
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# tokenize scaling: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, commit {commit}, "
          f"tiny preset, text-only records" + (f", --set {' '.join(a.set)}" if a.set else ""))
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        rows.append(run_child(n, 1, a.set))
        print(json.dumps(rows[-1]), flush=True)
    if a.two_node:
        rows.append(run_child(a.two_node, 2, a.set))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| records | nodes | shards | seconds | records/s | driver peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['records']:,} | {r['nodes']} | {r['shards']:,} | {r['seconds']} | {r['records_per_s']:,} | "
              f"{r['driver_peak_mb']:,} |")
    one = {r["records"]: r for r in rows if r["nodes"] == 1}
    if 10000 in one and max(one) > 10000:
        big = max(one)
        print(f"\ndriver peak RSS at {big:,} / at 10,000: {one[big]['driver_peak_mb'] / one[10000]['driver_peak_mb']:.2f}x "
              f"(target: <= 1.5x)")
    if 10000 in one and 100000 in one:
        print(f"records/s at 100,000 / at 10,000: {one[100000]['records_per_s'] / one[10000]['records_per_s']:.2f}x "
              f"(target: >= 0.8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
