"""Ray Train overhead on the VLM loop: step time of the TorchTrainer loop (1 worker)
over the same loop run as a plain PyTorch process, same model / batch / data, and the data-loading
share of the step (batch assembly incl. host->device). Both times are measured inside the loop
(steady state, first 3 steps dropped), so Ray start-up is not counted.

    python benchmarks/train_overhead.py --data runs/synth/llava_pretrain [--steps 60] [--write]
"""
from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds scripts whose names shadow stdlib modules (tokenize.py): drop the script dir
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="LLaVA-format folder (default: write a synthetic one)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="append the result to benchmarks/README_vlm.md")
    args = ap.parse_args()

    import torch

    from lumo_ray.config.vlm import VLMConfig
    from lumo_ray.data.synth import write_synth
    from trainers.context import LocalContext
    from trainers.vlm import prepare_run, run_loop, train_vlm

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="vlm_bench_"))
    data = args.data or write_synth(tmp / "synth", 256, 0, 0)["llava_pretrain_dir"]
    cfg = VLMConfig()
    cfg.data.path = str(data)
    cfg.llm.text_warmup_steps = 0  # timing only: the LLM's weights do not matter
    t = cfg.train
    t.steps, t.global_batch, t.num_workers = args.steps, args.batch, 1
    t.eval_every, t.ckpt_every, t.log_every = 0, args.steps, 10 ** 9

    cfg.train.out = str(tmp / "plain")
    cfg_p, run = prepare_run(cfg, cfg.train.out, log=lambda *_: None)
    bench: dict = {}
    run_loop(cfg_p, run, LocalContext(), log=lambda *_: None, bench=bench)
    plain = bench["step_time_s"]

    import ray
    if not ray.is_initialized():  # a private local cluster: never join someone else's
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg.train.out = str(tmp / "ray")
    res = train_vlm(cfg, log=lambda *_: None)
    timing = res["metrics"]["timing"]
    ray_step, ray_data = timing["step_time_s"], timing["data_time_s"]
    load = os.getloadavg()
    out = {"plain_step_s": plain, "ray_step_s": ray_step, "ratio": ray_step / plain,
           "data_share": ray_data / ray_step, "plain_data_share": bench["data_time_s"] / plain,
           "steps": args.steps, "global_batch": args.batch, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "loadavg_1m": load[0], "torch_threads": 1}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    print(json.dumps(out, indent=1))
    print(f"Ray Train / plain step time: {out['ratio']:.3f} (target <= 1.05, issue 35); data loading "
          f"{100 * out['data_share']:.2f}% of the step (target <= 5%)")
    if args.write:
        p = Path(__file__).with_name("README_vlm.md")
        head = "" if p.exists() else ("# VLM training overhead (benchmarks/train_overhead.py)\n\n| date | commit | machine | "
                                      "load (1 min) | steps x batch | plain step ms | Ray Train step ms | ratio | data share |\n"
                                      "|---|---|---|---|---|---|---|---|---|\n")
        with open(p, "a") as fh:
            fh.write(head + f"| {time.strftime('%Y-%m-%d')} | {commit} | {out['cores']} cores {platform.machine()}, CPU | "
                     f"{load[0]:.1f} | {args.steps} x {args.batch} | {1000 * plain:.1f} | {1000 * ray_step:.1f} | "
                     f"{out['ratio']:.3f} | {100 * out['data_share']:.2f}% |\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
