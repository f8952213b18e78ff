"""`lumo data tokenize`: manifest -> CPU load stage -> tokenizer actor pool -> deterministic shards.

Shards are planned on the driver from the manifest (split, then manifest order), and each shard is
cut into fixed units of `batch_size` records: a unit is one model batch, so the bytes never depend
on how many actors run. Finished shards whose inputs and sha256 match are skipped on a re-run;
the driver writes each tar (temp name + rename) as soon as all its units are back, and writes
index.json last. `--out` and `--manifest` may be local paths or object-store URIs (lumo_ray.storage):
the same bytes land either way.
"""
from __future__ import annotations

import json
import pickle
import time
from collections import Counter

import ray

from lumo_ray.config import LumoConfig
from lumo_ray.data import shard_set
from lumo_ray.data.manifest import dropped_warning, read_manifest
from lumo_ray.data.tokenize import (SampleTokenizer, plan_shards, plan_units, shard_input_digest,
                                    tokenize_config_digest)
from lumo_ray.runtime import Progress, rate_eta
from lumo_ray.storage import PathLike, locate

from .ray_env import init_ray


class UnitLoader:
    """CPU stage: decode/resample/resize every record of a unit (adapters built once per actor)."""

    def __init__(self, cfg_blob: bytes):
        self.tok = SampleTokenizer(pickle.loads(cfg_blob))

    def __call__(self, batch: dict) -> dict:
        loaded = [pickle.dumps([self.tok.load(r) for r in json.loads(recs)]) for recs in batch["records"]]
        return {"shard": batch["shard"], "unit": batch["unit"], "loaded": loaded}


class UnitTokenizer:
    """Model stage: adapters loaded once per actor; one unit = one batched encode."""

    def __init__(self, cfg_blob: bytes):
        self.tok = SampleTokenizer(pickle.loads(cfg_blob))

    def __call__(self, batch: dict) -> dict:
        out = [pickle.dumps(self.tok.tokenize(pickle.loads(b))) for b in batch["loaded"]]
        return {"shard": batch["shard"], "unit": batch["unit"], "results": out}


def run_tokenize(manifest: PathLike, cfg: LumoConfig, out_dir: PathLike, actors: int | None = None,
                 address: str | None = None, log=print) -> dict:
    """Tokenize a manifest into `<out>/<split>/shard-NNNNNN.tar` + errors.jsonl + summary.json + index.json."""
    out = locate(out_dir)
    tcfg = cfg.data.tokenize
    actors = actors or tcfg.actors
    records, read_errors = read_manifest(manifest)  # a missing manifest fails before anything is written
    ts = SampleTokenizer(cfg.uti).ts
    shard_set.start(out, cfg, manifest, ts)
    cfg_digest = tokenize_config_digest(cfg.uti, tcfg.shard_size, ts.hash, tcfg.batch_size)
    plan = plan_shards(records, tcfg.shard_size)
    keys = sorted(plan)
    digests = {k: shard_input_digest(plan[k], cfg_digest) for k in keys}
    stats = shard_set.finished_shards(out, digests)  # resume: keep finished shards, redo everything else
    todo = [k for k in keys if k not in stats]
    log(f"[tokenize] {len(records)} records -> {len(keys)} shards ({len(stats)} complete, {len(todo)} to write), "
        f"{actors} tokenizer actor(s), token space {ts.hash[:12]}")
    if todo:
        init_ray(address)
        blob = pickle.dumps(cfg.uti)
        units = [{"shard": sid, "unit": u, "records": json.dumps([r.to_dict() for r in chunk])}
                 for sid, key in enumerate(todo) for u, chunk in enumerate(plan_units(plan[key], tcfg.batch_size))]
        expected = Counter(u["shard"] for u in units)
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(UnitLoader, fn_constructor_args=(blob,), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=tcfg.loaders), num_cpus=tcfg.num_cpus_per_loader)
        ds = ds.map_batches(UnitTokenizer, fn_constructor_args=(blob,), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_gpus=tcfg.num_gpus_per_actor or None, num_cpus=tcfg.num_cpus_per_actor)
        pending: dict[int, dict[int, list]] = {}
        t0, done_before = time.time(), len(stats)
        bar = Progress(len(todo), "[tokenize] shards", "shards", log)
        for row in ds.iter_rows():  # a shard is written as soon as all its units are back
            sid = int(row["shard"])
            got = pending.setdefault(sid, {})
            got[int(row["unit"])] = pickle.loads(row["results"])
            if len(got) < expected[sid]:
                continue
            key = todo[sid]
            st = stats[key] = shard_set.write_shard(out, key, [r for u in sorted(pending.pop(sid)) for r in got[u]],
                                                    plan[key], digests[key])
            written = len(stats) - done_before
            bar.update(written, lambda: f"[tokenize] {len(stats)}/{len(keys)} shards, last {key[0]}/"
                       f"{shard_set.tar_of(out, key).name}: {st['samples']} samples, {len(st['errors'])} errors "
                       f"({time.time() - t0:.1f}s, {rate_eta(written, len(todo), t0, unit='shards')})")
        bar.close()
    summary, errors = shard_set.finish(out, stats, read_errors, records, ts, cfg_digest, tcfg.error_rate_ceiling)
    log(f"[tokenize] done: {summary['samples']} samples in {len(keys)} shards, {len(errors)} errors -> {out / 'index.json'}")
    warn = dropped_warning([e["reason"] for e in errors], summary["samples"] + len(errors), out / "errors.jsonl")
    if warn:
        log(f"[tokenize] {warn}")
    return summary
