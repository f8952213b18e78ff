"""FSDP without the whole model: the qwen3-0.6b preset (random init) on 2 CPU Ray Train workers, built
whole on every worker before sharding (train.meta_init=false, the path it replaces) and built on the
meta device with each worker filling only its shards (train.meta_init=true), side by side.

    python -m benchmarks.fsdp_meta [--steps 2] [--freeze new_rows] [--out DIR] [--set KEY=VALUE ...]

The tiny token space's synthetic shards (2,880 rows: 0.44 B parameters), micro-batch 1 x up to 256 tokens
per worker, fp32 on CPU, then eval and the export. Prints each worker's resident memory (max over the
two) at its start, through the model's build and sharding, in the steps and over the whole run (export
included), beside `lumo plan`'s per-worker estimate of a step; the two runs' losses; and the meta run's
export reloaded in this process and evaluated on the same eval shares. freeze new_rows (the program's
stage 3.3): the step itself is small, so the build and the export are what a worker's peak is made of.
Needs ~10 GB of RAM and a few minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

SEQ = 256


def reload_eval(export: Path, shards: Path, cfg, world: int) -> float:
    """The export's eval loss computed as the run computes it: each rank's share of the eval split, summed."""
    from lumo_ray.codecs.text import build_text_adapter
    from lumo_ray.data.mix import read_split
    from lumo_ray.data.sequences import SequenceBuilder
    from lumo_ray.models.token_lm import load_token_lm, task_loss_means, task_loss_sums

    model, ts, _ = load_token_lm(export)
    builder = SequenceBuilder(ts, cfg.token_lm.seq, build_text_adapter(cfg.uti.text).encode)
    tot = sum(task_loss_sums(model, builder, read_split(shards, "eval", rank=r, world_size=world, expected=ts))
              for r in range(world))
    return task_loss_means(tot)["all"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--freeze", default="new_rows", choices=["new_rows", "lora", "full"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], help="a config override for the data and both runs")
    a = ap.parse_args()

    import torch

    from pipelines.synth_shards import build_synth_shards
    from lumo_ray.config import LumoConfig, load_config
    from lumo_ray.plan import estimate, param_count, shape_of
    from trainers.token_lm import run_token_lm

    root = Path(a.out or tempfile.mkdtemp(prefix="lumo-fsdp-meta-"))
    quiet = dict(log=lambda *x, **k: None)
    shards, _, _ = build_synth_shards(root / "data", 12, 12, overrides=["data.normalize.eval_permille=250", *a.set],
                                   **quiet)
    runs, cfgs = {}, {}
    for meta in ("false", "true"):
        cfgs[meta] = load_config(LumoConfig, None, [
            f"token_lm.shards={shards}", f"token_lm.out={root / f'meta_{meta}'}", "token_lm.base=qwen3-0.6b",
            f"token_lm.freeze={a.freeze}", "token_lm.train.strategy=fsdp", f"token_lm.train.meta_init={meta}",
            "token_lm.train.num_workers=2", "token_lm.train.cpus_per_worker=1", f"token_lm.train.steps={a.steps}",
            "token_lm.train.global_batch=2", "token_lm.train.warmup_steps=1", f"token_lm.train.eval_every={a.steps}",
            f"token_lm.train.ckpt_every={a.steps}", "token_lm.train.log_every=1", f"token_lm.seq.max_len={SEQ}",
            "token_lm.seq.max_audio_tokens=60", "token_lm.seq.layouts=both", *a.set])
        runs[meta] = run_token_lm(cfgs[meta], **quiet)
    whole, meta = runs["false"], runs["true"]
    shape = shape_of("qwen3-0.6b", 2880)
    e = estimate(shape, freeze=a.freeze, strategy="fsdp", world=2, micro_batch=1, seq=SEQ, target_tokens=SEQ)
    model_gib = 4 * param_count(shape)["total"] / 2**30
    reloaded = reload_eval(root / "meta_true" / "export", shards, cfgs["true"], 2)
    loss_diff = max(abs(x - y) for x, y in zip(whole["loss_history"], meta["loss_history"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    print(f"# qwen3-0.6b token LM, FSDP on 2 CPU workers, freeze {a.freeze}, {a.steps} steps, micro-batch 1 x <= "
          f"{SEQ} tokens; {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, commit {commit}" + (f"; {' '.join(a.set)}" if a.set else ""))
    print(f"params {meta['trainable']['total']:,} ({model_gib:.2f} GiB fp32), trainable {meta['trainable']['trainable']:,}")
    print(f"losses whole {[round(x, 6) for x in whole['loss_history']]}, meta {[round(x, 6) for x in meta['loss_history']]}: "
          f"max |diff| {loss_diff:.2e}; eval whole {whole['eval_loss']:.6f}, meta {meta['eval_loss']:.6f}, "
          f"meta export reloaded {reloaded:.6f} (|diff| {abs(reloaded - meta['eval_loss']):.2e}); "
          f"{whole['seconds']:.0f} s / {meta['seconds']:.0f} s of steps")
    mw, mm = whole["memory"], meta["memory"]
    print("| per worker, max over the two (GiB) | whole-model build (meta_init false) | meta device (meta_init true) | meta / whole |")
    print("|---|---|---|---|")
    for key, what in (("start_rss_gb", "resident at start (before the model)"),
                      ("build_rss_gb", "peak through the build and sharding"),
                      ("steps_rss_gb", "peak during the training steps (sampled every 10 ms)"),
                      ("peak_rss_gb", "peak of the whole run (export included)")):
        print(f"| {what} | {mw[key]:.2f} | {mm[key]:.2f} | {mm[key] / mw[key]:.2f} |")
    print(f"| lumo plan estimate (tensors of one step, every position a target) | {e.peak / 2**30:.2f} | {e.peak / 2**30:.2f} | |")
    (root / "fsdp_meta.json").write_text(json.dumps({
        "memory": {"whole": mw, "meta": mm}, "estimate_gib": e.peak / 2**30, "losses": {"whole": whole["loss_history"],
        "meta": meta["loss_history"]}, "eval": {"whole": whole["eval_loss"], "meta": meta["eval_loss"],
        "meta_export_reloaded": reloaded}}, indent=2))


if __name__ == "__main__":
    main()
