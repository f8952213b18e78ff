"""Real-size smoke on CPU: the qwen3-0.6b preset (random init) trains 2 steps with FSDP across 2 Ray Train
workers, and its measured peak memory is set beside the planner's estimate.

    python -m benchmarks.fsdp_smoke [--steps 2] [--freeze full] [--out DIR]

The tiny token space's synthetic shards (2,880 rows: the model is 0.44 B parameters of decoder layers
plus 3 M of vocabulary), micro-batch 1 x up to 256 tokens per worker, fp32 on CPU. Prints the losses,
tokens/s, each worker's resident memory at its start (libraries, Ray, data) and peak (max over the
two), and `lumo plan`'s per-worker estimate for the same step. Needs ~16 GB of RAM and a few minutes.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--freeze", default="full", choices=["new_rows", "lora", "full"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch

    from pipelines.synth_shards import build_synth_shards
    from lumo_ray.config import LumoConfig, load_config
    from lumo_ray.plan import estimate, shape_of
    from trainers.token_lm import run_token_lm

    root = Path(a.out or tempfile.mkdtemp(prefix="lumo-fsdp-smoke-"))
    quiet = dict(log=lambda *x, **k: None)
    shards, _, _ = build_synth_shards(root / "data", 12, 12, overrides=["data.normalize.eval_permille=250"], **quiet)
    seq = 256
    cfg = load_config(LumoConfig, None, [
        f"token_lm.shards={shards}", f"token_lm.out={root / 'run'}", "token_lm.base=qwen3-0.6b", f"token_lm.freeze={a.freeze}",
        "token_lm.train.strategy=fsdp", "token_lm.train.num_workers=2", "token_lm.train.cpus_per_worker=1",
        f"token_lm.train.steps={a.steps}", "token_lm.train.global_batch=2", "token_lm.train.warmup_steps=1",
        f"token_lm.train.eval_every={a.steps}", f"token_lm.train.ckpt_every={a.steps}", "token_lm.train.log_every=1",
        f"token_lm.seq.max_len={seq}", "token_lm.seq.max_audio_tokens=60", "token_lm.seq.layouts=both"])
    m = run_token_lm(cfg, **quiet)
    e = estimate(shape_of("qwen3-0.6b", 2880), freeze=a.freeze, strategy="fsdp", world=2, micro_batch=1, seq=seq,
                 target_tokens=seq)
    mem = m["memory"]
    print(f"# qwen3-0.6b token LM, FSDP on 2 CPU workers, freeze {a.freeze}, {a.steps} steps, micro-batch 1 x <= {seq} "
          f"tokens; {platform.machine()}, {__import__('os').cpu_count()} CPUs, torch {torch.__version__}")
    print(f"params {m['trainable']['total']:,}, trainable {m['trainable']['trainable']:,}; losses "
          f"{[round(x, 4) for x in m['loss_history']]}, eval {m['eval_loss']:.4f}; {m['tokens_per_s']:.0f} tokens/s; "
          f"{m['seconds']:.0f} s")
    print("| per worker (max over the two) | GiB |\n|---|---|")
    print(f"| resident at start (before the model) | {mem['start_rss_gb']:.2f} |")
    print(f"| resident peak during the training steps (sampled every 10 ms) | {mem['steps_rss_gb']:.2f} |")
    print(f"| during the steps, less the start | {mem['steps_rss_gb'] - mem['start_rss_gb']:.2f} |")
    print(f"| lumo plan estimate (tensors of one step, every position a target) | {e.peak / 2**30:.2f} |")
    print(f"| resident peak of the whole run (build, steps, export; train.meta_init: benchmarks/fsdp_meta.py) "
          f"| {mem['peak_rss_gb']:.2f} |")
    (root / "smoke.json").write_text(json.dumps({"metrics_memory": mem, "estimate_gb": e.peak / 1e9}, indent=2))


if __name__ == "__main__":
    main()
