"""`lumo data tokenize`: manifest -> shard plan -> CPU loader pool -> tokenizer actor pool that
writes each shard itself -> index.json.

The driver plans shards in one streaming pass over the manifest (lumo_ray.data.shard_plan: a shard
is a byte range of the manifest and a split, so the driver never holds every record) and keeps only
each shard's stats. A loader actor reads its shard's records from the manifest and decodes the
media; a tokenizer actor encodes them in fixed model batches of `batch_size` (so the bytes never
depend on how many actors run) and writes the tar and its stats (temp name + commit) straight to
the output location. Finished shards whose inputs and sha256 match are skipped on a re-run; the
driver writes index.json last. `--out` and `--manifest` may be local paths or object-store URIs
(lumo_ray.storage): the same bytes land either way.
"""
from __future__ import annotations

import json
import pickle
import time
import ray

from lumo_ray.config import LumoConfig
from lumo_ray.data import shard_set
from lumo_ray.data.manifest import dropped_warning, require_manifest
from lumo_ray.data.shard_plan import ShardTask, plan_manifest, shard_records
from lumo_ray.data.tokenize import SampleTokenizer, text_token_bound, tokenize_config_digest
from lumo_ray.resources import job_resources
from lumo_ray.runtime import Progress, rate_eta
from lumo_ray.storage import PathLike, locate

from .ray_env import init_ray, placement, unit_device
from .status import require_fit


# Ray Data keeps per-block state on the driver: 15,626 one-shard blocks (1M records) cost it +203 MB and
# 190 s of scheduling in a bare pipeline of this shape, 200 blocks +32 MB and 12 s. Past this many
# shards a block holds several (a task writes them one after another; outputs still split by size).
MAX_BLOCKS = 512


class ShardLoader:
    """CPU stage: read a shard's records from the manifest and decode/resample/resize their media."""

    def __init__(self, cfg_blob: bytes, manifest: str, base: str | None):
        self.tok = SampleTokenizer(pickle.loads(cfg_blob))
        self.manifest, self.base = manifest, base

    def __call__(self, batch: dict) -> dict:
        loaded = [pickle.dumps([self.tok.load(r.to_dict())
                                for r in shard_records(ShardTask.from_json(t), self.manifest, self.base)])
                  for t in batch["task"]]
        return {"task": batch["task"], "loaded": loaded}


class ShardWriter:
    """Model stage: adapters loaded once per actor, on the device Ray gave it; encodes a shard in model
    batches and writes it."""

    def __init__(self, cfg_blob: bytes, out: str, batch_size: int, max_text_tokens: int = 0):
        uti = pickle.loads(cfg_blob)
        device, ids = unit_device()
        uti.runtime.device, self.placed = str(device), placement(device, ids)  # runtime: never in an identity
        self.tok = SampleTokenizer(uti, max_text_tokens)
        self.out, self.batch_size = locate(out), batch_size

    def __call__(self, batch: dict) -> dict:
        stats = []
        for t, blob in zip(batch["task"], batch["loaded"]):
            task, loaded = ShardTask.from_json(t), pickle.loads(blob)
            results = self.tok.tokenize_shard(loaded, self.batch_size)
            sources = {it["rec"]["id"]: it["rec"]["source"] for it in loaded}
            stats.append(json.dumps(shard_set.write_shard(self.out, task.key, results, sources, task.digest)))
        return {"stats": stats, "placed": [self.placed] * len(stats)}


def run_tokenize(manifest: PathLike, cfg: LumoConfig, out_dir: PathLike, actors: int | None = None,
                 address: str | None = None, log=print) -> dict:
    """Tokenize a manifest into `<out>/<split>/shard-NNNNNN.tar` + errors.jsonl + summary.json + index.json."""
    out = locate(out_dir)
    tcfg = cfg.data.tokenize
    loaders, encoders = job_resources(cfg, "tokenize", actors)
    actors = encoders.count
    require_manifest(manifest)  # before anything is written
    ts = SampleTokenizer(cfg.uti).ts
    shard_set.start(out, cfg, manifest, ts)
    bound = text_token_bound(cfg)  # caption + prompt tokens: a longer sample is an error row, never in a shard
    cfg_digest = tokenize_config_digest(cfg.uti, tcfg.shard_size, ts.hash, tcfg.batch_size, bound)
    plan = plan_manifest(manifest, tcfg.shard_size, cfg_digest, out, log=log)
    shard_set.check_split_folders(out, [t.key for t in plan.tasks])  # one line, before a worker starts
    stats = shard_set.finished_shards(out, {t.key: t.digest for t in plan.tasks})  # resume: keep finished shards
    todo = [t for t in plan.tasks if t.key not in stats]
    log(f"[tokenize] {plan.records} records -> {len(plan.tasks)} shards ({len(stats)} complete, {len(todo)} to "
        f"write), {actors} tokenizer actor(s), token space {ts.hash[:12]}")
    if todo:
        init_ray(address)
        require_fit([loaders, encoders])
        blob = pickle.dumps(cfg.uti)
        ds = ray.data.from_items([{"task": t.to_json()} for t in todo], override_num_blocks=min(len(todo), MAX_BLOCKS))
        ds = ds.map_batches(ShardLoader, fn_constructor_args=(blob, plan.manifest, plan.base), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=loaders.count), **loaders.ray_options())
        ds = ds.map_batches(ShardWriter, fn_constructor_args=(blob, str(out), tcfg.batch_size, bound), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=actors), **encoders.ray_options())
        t0, done_before, placed = time.time(), len(stats), set()
        bar = Progress(len(todo), "[tokenize] shards", "shards", log)
        for row in ds.iter_rows():  # each row: the stats of a shard its worker has written
            st = json.loads(row["stats"])
            key = (st["split"], st["index"])
            stats[key] = st
            placed.add(row["placed"])
            written = len(stats) - done_before
            bar.update(written, lambda: f"[tokenize] {len(stats)}/{len(plan.tasks)} shards, last {key[0]}/"
                       f"{shard_set.tar_of(out, key).name}: {st['samples']} samples, {len(st['errors'])} errors "
                       f"({time.time() - t0:.1f}s, {rate_eta(written, len(todo), t0, unit='shards')})")
        bar.close()
        log(f"[tokenize] tokenizer actors computed on: {'; '.join(sorted(placed))}")
    summary, errors = shard_set.finish(out, stats, plan.read_errors, plan.per_task, ts, cfg_digest,
                                       tcfg.error_rate_ceiling)
    log(f"[tokenize] done: {summary['samples']} samples in {len(plan.tasks)} shards, {len(errors)} errors -> "
        f"{out / 'index.json'}")
    warn = dropped_warning([e["reason"] for e in errors], summary["samples"] + len(errors), out / "errors.jsonl")
    if warn:
        log(f"[tokenize] {warn}")
    return summary
