"""Stage-1 VLM worker memory vs dataset size: the streamed data path beside the old preloading one.

A raw LLaVA-format JSON of N pairs reuses `lumo data synth` images under new ids (each pair its own
hard link, so the old path decodes every pair's image as it would a real dataset's). Tiny preset,
10 steps, global batch 16. Each measurement runs in fresh processes in a source tree (this one, and
--old: a `git worktree add /tmp/lumo_old 1882cb7` checkout of the pre-change commit):

- worker loop: the driver's prepare_run in one process, then the loop a Ray Train worker runs
  (trainers/vlm.py run_loop) alone in another, without Ray: its peak RSS (ru_maxrss). The new
  path then decodes in a thread of that process (counted), the old one preloads every image.
- Ray Train: `train_vlm` with 1 or 2 workers; worker peak RSS from metrics.json's memory block
  (new path only; the old path has none) and the data share of the step, data_time_s / step_time_s.

    python -m benchmarks.vlm_stream [--old /tmp/lumo_old] [--sizes 1000,50000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 10

# Runs in a source tree (new or old): only prepare_run / run_loop / train_vlm, which both have.
PROBE = r'''
import json, os, resource, sys
from pathlib import Path
mode, data, out, workers, actors = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
import lumo_ray
assert Path(lumo_ray.__file__).resolve().is_relative_to(Path.cwd().resolve()), lumo_ray.__file__
from lumo_ray.config.vlm import VLMConfig
cfg = VLMConfig()
cfg.data.path, cfg.data.eval_size, cfg.data.golden_size = data, 16, 4
cfg.llm.text_warmup_steps = 0
if actors >= 0:
    cfg.data.decode_actors = actors
t = cfg.train
t.out, t.steps, t.global_batch, t.warmup_steps = out, %(steps)d, 16, 2
t.ckpt_every, t.eval_every, t.log_every, t.num_workers = %(steps)d, 0, 10 ** 6, workers
quiet = lambda *_: None
if mode == "prep":
    from trainers.vlm import prepare_run
    prepare_run(cfg, out, quiet)
elif mode == "loop":
    from trainers.context import LocalContext
    from trainers.vlm import run_loop
    run_loop(cfg, Path(out).resolve(), LocalContext(), log=quiet)
else:
    from trainers.vlm import train_vlm
    train_vlm(cfg, log=quiet)
m = json.loads((Path(out) / "metrics.json").read_text()) if (Path(out) / "metrics.json").exists() else {}
print("PROBE " + json.dumps({"maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                             "timing": m.get("timing"), "memory": m.get("memory"),
                             "pad_fraction": m.get("pad_fraction")}))
''' % {"steps": STEPS}


def write_pairs(root: Path, n: int, images: list[dict], image_dir: Path) -> Path:
    """<root>/llava_pretrain/: N pairs cycling over the synthetic ones, image k a hard link."""
    d = root / "llava_pretrain"
    (d / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        src = images[k % len(images)]
        name = f"images/p{k:06d}.png"
        os.link(image_dir / src["image"], d / name)
        rows.append({**src, "id": f"p{k:06d}", "image": name})
    (d / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(rows))
    return d


def probe(tree: Path, mode: str, data: Path, out: Path, workers: int = 1, actors: int = -1) -> dict:
    """actors: vlm.data.decode_actors (-1: the tree's default; the old tree has no such knob)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", PROBE, mode, str(data), str(out), str(workers), str(actors)], cwd=tree,
                       env=env,
                       capture_output=True, text=True, timeout=3600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("PROBE ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{tree} {mode} {data.parent.name}: exit {p.returncode}\n{p.stderr[-3000:]}")
    return json.loads(line[6:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="/tmp/lumo_old", help="a checkout of the pre-change commit ('' = skip)")
    ap.add_argument("--sizes", default="1000,50000")
    args = ap.parse_args()
    from lumo_ray.data.synth import write_synth

    sizes = [int(s) for s in args.sizes.split(",")]
    trees = {"streamed": REPO}
    if args.old and (Path(args.old) / "trainers" / "vlm.py").exists():
        trees["preload (old)"] = Path(args.old)
    tmp = Path(tempfile.mkdtemp(prefix="vlm_stream_bench_"))
    synth = Path(write_synth(tmp / "synth", 500, 0, seed=0)["llava_pretrain_dir"])
    base = json.loads(next(synth.glob("*.json")).read_text())
    data = {n: write_pairs(tmp / f"pairs{n}", n, base, synth) for n in sizes}
    rows: dict[str, dict[str, str]] = {}

    def put(measure: str, tree: str, value: str) -> None:
        rows.setdefault(measure, {})[tree] = value
        print(f"  {measure} [{tree}]: {value}", flush=True)

    for name, tree in trees.items():
        for n in sizes:
            out = tmp / f"{name[:4]}_{n}"
            probe(tree, "prep", data[n], out)
            r = probe(tree, "loop", data[n], out)
            put(f"worker loop peak RSS, {n:,} pairs (GB)", name, f"{r['maxrss_gb']:.3f}")
        if name == "streamed":
            for n in sizes:
                r = probe(tree, "ray", data[n], tmp / f"ray1_{n}", 1)
                put(f"Ray Train 1 worker: worker peak RSS, {n:,} pairs (GB)", name, f"{r['memory']['peak_rss_gb']:.3f}")
        for actors, how in ((-1, ""), (0, " (decode_actors 0: in-process thread)"))[: 2 if name == "streamed" else 1]:
            r = probe(tree, "ray", data[sizes[0]], tmp / f"{name[:4]}_ray2_{actors}", 2, actors)
            tm = r["timing"]
            put(f"Ray Train 2 workers, {sizes[0]:,} pairs: data_time / step_time{how}", name,
                f"{tm['data_time_s']:.4f} / {tm['step_time_s']:.4f} s = {tm['data_time_s'] / tm['step_time_s']:.1%}")
            if r.get("pad_fraction") is not None and actors == -1:
                put(f"Ray Train 2 workers, {sizes[0]:,} pairs: pad_fraction", name, f"{r['pad_fraction']:.3f}")
    names = list(trees)
    print(f"\n# {os.cpu_count()} CPUs; tiny preset, {STEPS} steps, global batch 16")
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for measure, vals in rows.items():
        print(f"| {measure} | " + " | ".join(vals.get(t, "-") for t in names) + " |")
    for name in names:
        a, b = (rows.get(f"worker loop peak RSS, {n:,} pairs (GB)", {}).get(name) for n in (sizes[0], sizes[-1]))
        if a and b:
            print(f"{name}: {sizes[-1]:,} / {sizes[0]:,} pairs worker loop peak RSS = {float(b) / float(a):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
