"""Ray Data job for `lumo data normalize` (docs/stage2_data.md).

    from pipelines.normalize import run_normalize
    summary = run_normalize("clotho", "data/clotho", "runs/norm-clotho", NormalizeConfig())

The driver reads the raw metadata (cheap, and gives one place for read errors); Ray Data probes the
media in parallel (`map_batches` of `probe_batch_size` records); results are collected and sorted
by id, so the outputs do not depend on task scheduling or the number of workers. On a cluster the
media paths must be readable from every node (shared file system or the same mount).

Also runnable directly:  python -m pipelines.normalize --source clotho --input PATH --out DIR
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Iterable, Optional

from lumo_ray.config import LumoConfig, NormalizeConfig, load_config
from lumo_ray.data.normalize import NormalizeError, log, normalize_with, probe_batch, read_and_dedupe
from lumo_ray.resources import task_resources
from lumo_ray.runtime import Progress
from pipelines.ray_env import init_ray
from pipelines.status import require_fit


def _ray_probe(cfg: NormalizeConfig):
    def run(rows: list[dict]) -> Iterable[dict]:
        import ray

        if not rows:
            return []
        n_blocks = max(1, math.ceil(len(rows) / cfg.probe_batch_size))
        ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
        ds = ds.map_batches(probe_batch, batch_size=cfg.probe_batch_size, batch_format="numpy",
                            fn_kwargs={"min_audio_seconds": cfg.min_audio_seconds},
                            **task_resources("normalize", cfg).ray_options())
        out: list[dict] = []
        log(f"probing {len(rows)} records on Ray Data ({n_blocks} batches of {cfg.probe_batch_size})")
        bar = Progress(len(rows), "[normalize] probed", "records", log, console=True)
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):  # whole blocks as they finish
            out.extend({"id": str(i), "ok": bool(k), "json": str(j)} for i, k, j in zip(b["id"], b["ok"], b["json"]))
            n = len(out)  # plain lines: one per tenth, not per batch
            bar.update(n, lambda: f"  probed {n}/{len(rows)} ({bar.rate(n)})")
        bar.close()
        return out
    return run


def run_normalize(source: str, input_path: str | Path, out_dir: str | Path,
                  cfg: Optional[NormalizeConfig] = None, address: Optional[str] = None,
                  read: Optional[tuple] = None) -> dict:
    """Normalize one dataset into `out_dir` (manifest.jsonl, errors.jsonl, summary.json, config.yaml).

    source: 'llava_pretrain' | 'audiocaps' | 'clotho' | 'wavcaps' | 'jsonl'; input_path: the dataset
    folder or its metadata file; address: a Ray cluster (default: RAY_ADDRESS, a running local
    cluster, else a new local one); read: read_and_dedupe's result when the caller has it. Returns
    the summary dict. Raises NormalizeError (after writing every file) when the error rate exceeds
    cfg.error_rate_ceiling."""
    cfg = cfg or NormalizeConfig()
    read = read or read_and_dedupe(source, input_path)  # a missing or malformed input fails here, before Ray starts
    init_ray(address)
    require_fit([task_resources("normalize", cfg)])
    return normalize_with(_ray_probe(cfg), source, input_path, out_dir, cfg, read=read)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True)
    ap.add_argument("--input", required=True, help="dataset folder or its metadata file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", help="YAML (LumoConfig); data.normalize is used")
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. data.normalize.min_eval=2")
    ap.add_argument("--address")
    a = ap.parse_args(argv)
    cfg = load_config(LumoConfig, a.config, a.set).data.normalize
    try:
        run_normalize(a.source, a.input, a.out, cfg, a.address)
    except NormalizeError as e:
        print(f"[normalize] FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
