"""Tokenization throughput: (a) the Ray Data pipeline vs (b) a plain batched loop vs (c) one sample
at a time (the public code's method), on the same cores, model and inputs.

    python -m benchmarks.tokenize --clips 96 --images 8 [--audio-model full-24k] [--image-model full]

Every variant loads the files, normalizes and encodes them (the pipeline also writes shards). The
pipeline runs `--actors` tokenizer actors x `--calls` shards at once, one torch thread each (default: one
actor, one call per core, no loader actor); the loops use one process with as many torch threads as the
pipeline encodes shards at once, so both get the same cores. Ray is started before
timing; actor start-up (imports, model build) is inside the pipeline's time, as a user pays it, and
the loops' model build inside theirs. Printed: end-to-end and steady-state rates of each variant, the
a/b and a/c ratios, the pipeline's per-stage table (run_tokenize's timings: wall and CPU seconds),
the machine, the load average before and after, and the commit.
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


def loop(cfg: LumoConfig, recs, batch: int, threads: int) -> tuple[float, float | None, float]:
    """Load + tokenize every record in manifest order, `batch` at a time, in this process, model build
    included (the models build on first use). (seconds, steady-state samples/s after the first batch,
    CPU seconds of this process)."""
    cfg.uti.runtime.threads = threads
    t0, c0 = time.perf_counter(), time.process_time()
    tok = SampleTokenizer(cfg.uti)
    first, after = None, 0
    for shard in plan_shards(recs, cfg.data.tokenize.shard_size).values():
        for unit in plan_units(shard, batch):
            res = tok.tokenize([tok.load(r.to_dict()) for r in unit])
            assert all("members" in r for r in res), [r.get("error") for r in res if "error" in r]
            if first is None:
                first = time.perf_counter()
            else:
                after += len(unit)
    dt = time.perf_counter() - t0
    return dt, (after / (t0 + dt - first) if after else None), time.process_time() - c0


def pipeline(cfg: LumoConfig, manifest: Path, out: Path, actors: int) -> tuple[float, dict]:
    """(end-to-end seconds, the run's timings: per-stage seconds, steady-state samples/s after the first
    shard is back)."""
    import ray

    from pipelines.tokenize import run_tokenize
    cfg.uti.runtime.threads = 1
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    summary = run_tokenize(manifest, cfg, out, actors=actors, log=lambda *a: None)
    dt = time.perf_counter() - t0
    ray.shutdown()
    return dt, summary["timings"]


def commit() -> str:
    """HEAD's short hash, '+dirty' when the working tree differs from it."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    dirty = "+dirty" if git("status", "--porcelain", "-uno") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def stage_table(timings: dict, wall: float) -> list[str]:
    """The pipeline's per-stage lines: wall seconds, share of its end-to-end wall time, CPU seconds of
    the process(es) in the stage, what the stage is."""
    from pipelines.tokenize import TIMINGS

    secs = timings["seconds"]
    lines = [f"  {'stage':18s} {'wall s':>8s} {'% wall':>7s} {'cpu s':>8s}  what (worker stages: summed over the "
             "pool's actors)"]
    for k in list(TIMINGS) + sorted(set(secs) - set(TIMINGS)):
        if k in secs:
            w, c = secs[k]
            lines.append(f"  {k:18s} {w:8.2f} {100 * w / wall:6.1f}% {c:8.2f}  {TIMINGS.get(k, '')}")
    busy = sum(secs.get(k, (0.0, 0.0))[0] for k in ("writer_unpickle", "model_batches", "tar_write"))
    span = sum(secs.get(k, (0.0, 0.0))[0] for k in ("driver_startup", "driver_wait", "driver_rows"))
    slots = timings["actors"] * timings.get("calls_per_actor", 1)  # calls that can encode at once
    lines.append(f"  tokenizer calls busy {busy:.1f} s of {slots} x {span:.1f} s from Ray start to the "
                 f"last shard ({100 * busy / max(slots * span, 1e-9):.0f}%)")
    p, st, rd = timings["actor_process_cpu"], timings["actor_started_s"], timings["actor_ready_s"]
    lines.append(f"  whole-process CPU: driver {secs['total'][1]:.1f} s, loader actors {p['loader']:.1f} s, "
                 f"tokenizer actors {p['tokenizer']:.1f} s (imports, model build and Ray's threads included)")
    if rd["tokenizer"] is not None:
        s = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731 (no loader actor with loaders 0)
        lines.append(f"  Ray Data launched: the last loader / tokenizer actor entered its constructor after "
                     f"{s(st['loader'])} / {s(st['tokenizer'])} s (process start, imports), was ready after "
                     f"{s(rd['loader'])} / {s(rd['tokenizer'])} s (first shard back: driver_startup)")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--audio-model", default="full-24k")
    ap.add_argument("--image-model", default="full")
    ap.add_argument("--bandwidth", type=float, default=6.0)
    ap.add_argument("--batch-size", type=int, default=16)
    # (a)'s default layout is the one that does best on a few CPU cores: one actor, one call per core
    # (threads over one copy of the models: imports and weights paid once), no loader process
    ap.add_argument("--actors", type=int, default=1, help="(a)'s tokenizer actors; the loops get actors x calls "
                    "torch threads")
    ap.add_argument("--calls", type=int, default=os.cpu_count() or 1, help="(a)'s shards at once per tokenizer "
                    "actor (data.tokenize.calls_per_actor: threads over one copy of the models)")
    ap.add_argument("--loaders", type=int, default=0, help="(a)'s loader actors (data.tokenize.loaders; 0: the "
                    "tokenizer actors decode their shards themselves)")
    ap.add_argument("--skip-single", action="store_true", help="skip the one-at-a-time loop (slow)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)

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
        "uti.image.resolution=256", f"data.tokenize.batch_size={a.batch_size}", f"data.tokenize.shard_size={a.batch_size}",
        f"data.tokenize.loaders={a.loaders}", f"data.tokenize.calls_per_actor={a.calls}"])
    n = len(recs)
    audio_s = sum(r.meta["probe"]["audio"]["seconds"] for r in recs if "audio" in r.modalities)

    load0 = os.getloadavg()
    times, steady, cpu_s = {}, {}, {}
    cores = a.actors * a.calls  # (a)'s encoding threads: the loops get as many torch threads
    times["b_batched_loop"], steady["b_batched_loop"], cpu_s["b_batched_loop"] = loop(cfg, recs, a.batch_size, cores)
    if not a.skip_single:
        times["c_one_at_a_time"], steady["c_one_at_a_time"], cpu_s["c_one_at_a_time"] = loop(cfg, recs, 1, cores)
    times["a_ray_pipeline"], timings = pipeline(cfg, work / "manifest.jsonl", work / "shards", a.actors)
    steady["a_ray_pipeline"] = timings["steady_samples_per_s"]
    cpu_s["a_ray_pipeline"] = timings["seconds"]["total"][1] + sum(timings["actor_process_cpu"].values())
    load1 = os.getloadavg()

    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, no GPU"
           if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
           "commit": commit(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
           "samples": n, "clips": a.clips, "images": a.images, "audio_seconds": audio_s,
           "audio_model": a.audio_model, "image_model": a.image_model, "actors": a.actors, "calls": a.calls,
           "loaders": a.loaders, "batch_size": a.batch_size,
           "load_avg_before": load0, "load_avg_after": load1, "seconds": times,
           "samples_per_s": {k: n / v for k, v in times.items()},
           "audio_s_per_s": {k: audio_s / v for k, v in times.items()},
           "steady_samples_per_s": steady, "cpu_seconds": cpu_s,
           "ratio_a_over_b": times["b_batched_loop"] / times["a_ray_pipeline"],
           "pipeline_timings": timings}
    sa, sb = steady["a_ray_pipeline"], steady["b_batched_loop"]
    res["ratio_steady_a_over_b"] = sa / sb if sa and sb else None
    if "c_one_at_a_time" in times:
        res["ratio_a_over_c"] = times["c_one_at_a_time"] / times["a_ray_pipeline"]
    print(f"machine: {res['machine']}; commit {res['commit']}; OMP_NUM_THREADS={res['omp_num_threads']}")
    print("load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(*load0, *load1))
    print(f"{n} samples ({a.clips} clips = {audio_s:.0f} s of audio with {a.audio_model} @ {a.bandwidth} kbps, "
          f"{a.images} images with VQ '{a.image_model}' @ 256 px), batch {a.batch_size}, {a.actors} actor(s) x {a.calls} "
          f"call(s) at once, {a.loaders} loader(s)")
    print(f"{'variant':18s} {'seconds':>8s} {'samples/s':>10s} {'audio s/s':>10s} {'steady samples/s':>17s} "
          f"{'cpu s':>7s}")
    for k, v in times.items():
        st = f"{steady[k]:17.2f}" if steady.get(k) else f"{'-':>17s}"
        print(f"{k:18s} {v:8.1f} {n / v:10.2f} {audio_s / v:10.1f} {st} {cpu_s[k]:7.1f}")
    print("(steady: (a) after its first shard is back, (b)/(c) after their first batch; cpu: (a) its driver and "
          "actor processes, Ray's own daemons not counted)")
    print(f"a/b end to end = {res['ratio_a_over_b']:.2f} (target >= 0.9)" +
          (f"   a/b steady = {res['ratio_steady_a_over_b']:.2f}" if res["ratio_steady_a_over_b"] else "") +
          (f"   a/c = {res['ratio_a_over_c']:.2f}" if "ratio_a_over_c" in res else ""))
    print(f"(a) per stage ({timings['shards_written']} shards, {timings['loaders']} loader + {timings['actors']} "
          f"tokenizer actor(s) x {timings['calls_per_actor']} call(s)):")
    print("\n".join(stage_table(timings, times["a_ray_pipeline"])))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
