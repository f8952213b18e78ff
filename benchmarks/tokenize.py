"""Tokenization throughput: (a) the Ray Data pipeline vs (b) a plain batched loop vs (c) one sample
at a time (the public code's method), on the same cores, model and inputs.

    python -m benchmarks.tokenize --clips 96 --images 8 [--audio-model full-24k] [--image-model full]

Every variant loads the files, normalizes and encodes them (the pipeline also writes shards). The
pipeline runs `--actors` tokenizer actors with one torch thread each; the loops use one process with
as many torch threads as the pipeline has actors, so both get the same cores. Ray is started before
timing; actor start-up (imports, model build) is inside the pipeline's time, as a user pays it.
"""
from __future__ import annotations

import sys

# Run as a script, this file's folder would come first on sys.path and shadow the stdlib `tokenize`.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
    sys.path.pop(0)

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.manifest import read_manifest, write_manifest
from lumo_ray.data.normalize import normalize_local
from lumo_ray.data.synth import write_synth
from lumo_ray.data.tokenize import SampleTokenizer, plan_shards, plan_units


def loop(cfg: LumoConfig, recs, batch: int, threads: int) -> float:
    """Load + tokenize every record in manifest order, `batch` at a time, in this process."""
    cfg.uti.runtime.threads = threads
    tok = SampleTokenizer(cfg.uti)
    t0 = time.perf_counter()
    for shard in plan_shards(recs, cfg.data.tokenize.shard_size).values():
        for unit in plan_units(shard, batch):
            res = tok.tokenize([tok.load(r.to_dict()) for r in unit])
            assert all("members" in r for r in res), [r.get("error") for r in res if "error" in r]
    return time.perf_counter() - t0


def pipeline(cfg: LumoConfig, manifest: Path, out: Path, actors: int) -> tuple[float, float | None]:
    """(end-to-end seconds, steady-state samples/s after the first shard is written)."""
    import re

    import ray

    from pipelines.tokenize import run_tokenize
    cfg.uti.runtime.threads = 1
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    marks: list[tuple[float, int]] = []

    def log(line: str) -> None:
        m = re.search(r"shards .*: (\d+) samples", line)
        if m:
            marks.append((time.perf_counter(), int(m.group(1))))

    t0 = time.perf_counter()
    run_tokenize(manifest, cfg, out, actors=actors, log=log)
    dt = time.perf_counter() - t0
    ray.shutdown()
    steady = (sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0])) if len(marks) > 1 else None
    return dt, steady


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--audio-model", default="full-24k")
    ap.add_argument("--image-model", default="full")
    ap.add_argument("--bandwidth", type=float, default=6.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--actors", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-single", action="store_true", help="skip the one-at-a-time loop (slow)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lumo-bench-"))
    write_synth(work / "synth", a.images, a.clips, seed=0)
    recs = []
    for src in ("audiocaps", "llava_pretrain"):
        if (work / "synth" / src).exists():
            normalize_local(src, work / "synth" / src, work / f"norm_{src}")
            recs += read_manifest(work / f"norm_{src}" / "manifest.jsonl")[0]
    write_manifest(recs, work / "manifest.jsonl")
    cfg = load_config(LumoConfig, None, [
        f"uti.audio.model={a.audio_model}", f"uti.audio.bandwidth={a.bandwidth}", f"uti.image.model={a.image_model}",
        "uti.image.resolution=256", f"data.tokenize.batch_size={a.batch_size}", f"data.tokenize.shard_size={a.batch_size}"])
    n = len(recs)
    audio_s = sum(r.meta["probe"]["audio"]["seconds"] for r in recs if "audio" in r.modalities)

    load0 = os.getloadavg()[0]
    times = {"b_batched_loop": loop(cfg, recs, a.batch_size, a.actors)}
    if not a.skip_single:
        times["c_one_at_a_time"] = loop(cfg, recs, 1, a.actors)
    times["a_ray_pipeline"], steady = pipeline(cfg, work / "manifest.jsonl", work / "shards", a.actors)

    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, no GPU"
           if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
           "samples": n, "clips": a.clips, "images": a.images, "audio_seconds": audio_s,
           "audio_model": a.audio_model, "image_model": a.image_model, "actors": a.actors, "batch_size": a.batch_size,
           "load_avg_1min_before": load0, "load_avg_1min_after": os.getloadavg()[0], "seconds": times,
           "samples_per_s": {k: n / v for k, v in times.items()},
           "audio_s_per_s": {k: audio_s / v for k, v in times.items()},
           "ratio_a_over_b": times["b_batched_loop"] / times["a_ray_pipeline"],
           "pipeline_steady_samples_per_s": steady,
           "ratio_steady_a_over_b": steady / (n / times["b_batched_loop"]) if steady else None}
    if "c_one_at_a_time" in times:
        res["ratio_a_over_c"] = times["c_one_at_a_time"] / times["a_ray_pipeline"]
    print(f"machine: {res['machine']}")
    print(f"{n} samples ({a.clips} clips = {audio_s:.0f} s of audio with {a.audio_model} @ {a.bandwidth} kbps, "
          f"{a.images} images with VQ '{a.image_model}' @ 256 px), batch {a.batch_size}, {a.actors} actor(s)")
    print(f"{'variant':18s} {'seconds':>8s} {'samples/s':>10s} {'audio s/s':>10s}")
    for k, v in times.items():
        print(f"{k:18s} {v:8.1f} {n / v:10.2f} {audio_s / v:10.1f}")
    if steady:
        print(f"a steady state (after the first shard): {steady:.2f} samples/s, a/b = {res['ratio_steady_a_over_b']:.2f}")
    print(f"a/b end to end = {res['ratio_a_over_b']:.2f} (target >= 0.9)" +
          (f"   a/c = {res['ratio_a_over_c']:.2f}" if "ratio_a_over_c" in res else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
