"""`lumo data tokenize`: manifest -> shard plan -> CPU loader pool -> tokenizer actor pool that
writes each shard itself -> index.json.

The driver plans shards in one streaming pass over the manifest (lumo_ray.data.shard_plan: a shard
is a byte range of the manifest and a split, so the driver never holds every record) and keeps only
each shard's stats. A loader actor reads its shard's records from the manifest and decodes the
media; a tokenizer actor encodes them in fixed model batches of `batch_size` (so the bytes never
depend on how many actors run) and writes the tar and its stats (temp name + commit) straight to
the output location. Finished shards whose inputs and sha256 match are skipped on a re-run; the
driver writes index.json last. The run's seconds per stage (TIMINGS) come back with its summary,
never into the output folder, whose bytes stay a function of the inputs. `--out` and `--manifest`
may be local paths or object-store URIs (lumo_ray.storage): the same bytes land either way.
"""
from __future__ import annotations

import json
import os
import pickle
import time

import ray
import torch

from lumo_ray.config import LumoConfig
from lumo_ray.data import shard_set
from lumo_ray.data.manifest import dropped_warning
from lumo_ray.data.shard_plan import ShardTask, plan_manifest, shard_records
from lumo_ray.data.tokenize import SampleTokenizer, StageClock, text_token_bound, tokenize_config_digest
from lumo_ray.tokenize_request import tokenize_request
from lumo_ray.runtime import Progress
from lumo_ray.storage import PathLike, locate

from .ray_env import init_ray, placement, unit_device
from .status import require_fit


# Ray Data keeps per-block state on the driver: 15,626 one-shard blocks (1M records) cost it +203 MB and
# 190 s of scheduling in a bare pipeline of this shape, 200 blocks +32 MB and 12 s. Past this many
# shards a block holds several (a task writes them one after another; outputs still split by size).
MAX_BLOCKS = 512

# A run's timings, "seconds": {stage: [wall, CPU of the process]}; worker stages are summed over a pool's
# actors (so they may add up to more than the run's wall time). Per pool (actor_summary):
# "actor_process_cpu", its processes' whole CPU (imports and Ray's threads too) at their last row;
# "actor_started_s" / "actor_ready_s", when its last actor's constructor began / ended.
TIMINGS = {
    "driver_token_space": "driver: adapters + token space (builds a random preset's models)",
    "driver_plan": "driver: output folder, shard plan, resume check",
    "driver_startup": "driver: Ray + Ray Data start until the first shard is back (actor start-up, first shard)",
    "driver_wait": "driver: waiting on Ray Data for the later shards",
    "driver_rows": "driver: handling each shard's stats row (progress line)",
    "driver_finish": "driver: errors.jsonl, summary.json, index.json",
    "loader_init": "loader actors: adapters (no model)",
    "load_read": "loader actors: a shard's records from its manifest byte range",
    "load_decode": "loader actors: media decode / resample / resize",
    "load_pickle": "loader actors: pickling the loaded shard for the tokenizers",
    "writer_init": "tokenizer actors: adapters, the driver's built weights and token space assigned",
    "writer_unpickle": "tokenizer actors: unpickling a loaded shard",
    "model_batches": "tokenizer actors: model batches (encode + sample members)",
    "tar_write": "tokenizer actors: tar + stats file written",
    "total": "driver: the whole run_tokenize call",
}


def actor_times(role: str, launched: float, started: float, ready: float) -> str:
    """{'<role> <pid>': {cpu: this process's CPU seconds so far (imports, build, work), started / ready:
    seconds after the driver launched the pipeline that its constructor began / ended (time.time())}}."""
    return json.dumps({f"{role} {os.getpid()}": {"cpu": time.process_time(), "started": started - launched,
                                                 "ready": ready - launched}})


def call_clock(init: list) -> StageClock:
    """A clock for one call of an actor: calls may run at once in its threads (calls_per_actor), so each
    has its own and counts its own thread's CPU; the first call also carries the constructor's seconds
    (`init`: [its clock's take()], popped once)."""
    clock = StageClock(time.thread_time)
    try:
        clock.add(init.pop())  # atomic: only one call gets it
    except IndexError:
        pass
    return clock


class ShardLoader:
    """CPU stage: read a shard's records from the manifest and decode/resample/resize their media."""

    def __init__(self, cfg_blob: bytes, manifest: str, base: str | None, launched: float = 0.0,
                 tok: SampleTokenizer | None = None):
        clock, self.launched, self.started = StageClock(time.thread_time), launched, time.time()
        with clock("loader_init"):
            self.tok = tok or SampleTokenizer(pickle.loads(cfg_blob))
            self.manifest, self.base = manifest, base
        self.init, self.ready = [clock.take()], time.time()

    def __call__(self, batch: dict) -> dict:
        clock = call_clock(self.init)
        loaded, timings = [], []
        for t in batch["task"]:
            with clock("load_read"):
                recs = shard_records(ShardTask.from_json(t), self.manifest, self.base)
            with clock("load_decode"):
                items = [self.tok.load(r.to_dict()) for r in recs]
            with clock("load_pickle"):
                loaded.append(pickle.dumps(items))
            timings.append(json.dumps(clock.take()))
        procs = [actor_times("loader", self.launched, self.started, self.ready)] * len(loaded)
        return {"task": batch["task"], "loaded": loaded, "timings": timings, "procs": procs}


class ShardWriter:
    """Model stage: adapters loaded once per actor, on the device Ray gave it; encodes a shard in model
    batches and writes it. load_from (manifest, base): no loader pool (data.tokenize.loaders 0), this
    actor reads and decodes its shards itself. calls > 1 (data.tokenize.calls_per_actor): that many shards
    at once, in Ray's threads, over this one SampleTokenizer."""

    def __init__(self, cfg_blob: bytes, out: str, batch_size: int, max_text_tokens: int = 0, launched: float = 0.0,
                 built: list | None = None, load_from: tuple | None = None, calls: int = 1):
        clock, self.launched, self.started = StageClock(time.thread_time), launched, time.time()
        with clock("writer_init"):
            uti = pickle.loads(cfg_blob)
            device, ids = unit_device()
            uti.runtime.device, self.placed = str(device), placement(device, ids)  # runtime: never in an identity
            if calls > 1:  # each encode sets the configured thread count and restores the process's: make
                torch.set_num_threads(uti.runtime.threads)  # them equal, or one call's restore moves another's
            # the driver's token space and built weights ([object ref]): drawing a full-size preset again
            # took seconds of CPU per actor, on the cores the other actors start on
            self.tok = SampleTokenizer(uti, max_text_tokens, ray.get(built[0]) if built else None)
            self.tok.build_models()  # now, while the loaders start, not on the first shard
            self.out, self.batch_size = locate(out), batch_size
        self.init = [clock.take()]
        self.loader = ShardLoader(cfg_blob, *load_from, launched, self.tok) if load_from else None
        self.ready = time.time()

    def __call__(self, batch: dict) -> dict:
        if self.loader is not None:  # its seconds go into the loader stages; its process is this one
            batch = {**self.loader(batch), "procs": ["{}"] * len(batch["task"])}
        clock = call_clock(self.init)
        stats, timings, procs = [], [], []
        for t, blob, before, proc in zip(batch["task"], batch["loaded"], batch["timings"], batch["procs"]):
            clock.add(json.loads(before))  # the loader's seconds for this shard travel with it
            with clock("writer_unpickle"):
                task, loaded = ShardTask.from_json(t), pickle.loads(blob)
            with clock("model_batches"):
                results = self.tok.tokenize_shard(loaded, self.batch_size)
            with clock("tar_write"):
                sources = {it["rec"]["id"]: it["rec"]["source"] for it in loaded}
                stats.append(json.dumps(shard_set.write_shard(self.out, task.key, results, sources, task.digest)))
            timings.append(json.dumps(clock.take()))
            mine = actor_times("tokenizer", self.launched, self.started, self.ready)
            procs.append(json.dumps({**json.loads(proc), **json.loads(mine)}))
        return {"stats": stats, "placed": [self.placed] * len(stats), "timings": timings, "procs": procs}


def actor_summary(procs: dict) -> dict:
    """Per pool: its processes' whole CPU (summed), and when its last actor began / finished its
    constructor (seconds after the launch: process start-up and imports, then adapters and models)."""
    roles = ("loader", "tokenizer")
    mine = {r: [v for k, v in procs.items() if k.split()[0] == r] for r in roles}
    return {"actor_process_cpu": {r: sum(v["cpu"] for v in mine[r]) for r in roles},
            "actor_started_s": {r: max((v["started"] for v in mine[r]), default=None) for r in roles},
            "actor_ready_s": {r: max((v["ready"] for v in mine[r]), default=None) for r in roles}}


def run_tokenize(manifest: PathLike, cfg: LumoConfig, out_dir: PathLike, actors: int | None = None,
                 address: str | None = None, log=print) -> dict:
    """Tokenize a manifest into `<out>/<split>/shard-NNNNNN.tar` + errors.jsonl + summary.json + index.json.
    Returns the summary plus `timings`: seconds per stage (TIMINGS) and per actor pool (actor_summary)."""
    clock = StageClock()
    start = clock.read()
    out = locate(out_dir)
    tcfg = cfg.data.tokenize
    loaders, encoders = tokenize_request(cfg, manifest, actors)
    actors, calls = encoders.count, tcfg.calls_per_actor
    with clock("driver_token_space"):
        tok = SampleTokenizer(cfg.uti)
        ts = tok.ts  # a random preset's identity is its weights: this builds the models (handed to the actors)
    with clock("driver_plan"):
        shard_set.start(out, cfg, manifest, ts)
        bound = text_token_bound(cfg)  # caption + prompt tokens: a longer sample is an error row, never in a shard
        cfg_digest = tokenize_config_digest(cfg.uti, tcfg.shard_size, ts.hash, tcfg.batch_size, bound)
        plan = plan_manifest(manifest, tcfg.shard_size, cfg_digest, out, log=log)
        shard_set.check_split_folders(out, [t.key for t in plan.tasks])  # one line, before a worker starts
        stats = shard_set.finished_shards(out, {t.key: t.digest for t in plan.tasks})  # resume: keep finished shards
    todo = [t for t in plan.tasks if t.key not in stats]
    log(f"[tokenize] {plan.records} records -> {len(plan.tasks)} shards ({len(stats)} complete, {len(todo)} to "
        f"write), {actors} tokenizer actor(s){f' x {calls} calls at once' if calls > 1 else ''}, token space "
        f"{ts.hash[:12]}")
    steady, procs = None, {}
    if todo:
        clock.mark()  # driver_startup: Ray, the plan handed to Ray Data, actor start-up, the first shard
        init_ray(address)
        require_fit([g for g in (loaders, encoders) if g.count])
        blob = pickle.dumps(cfg.uti)
        built = [ray.put(tok.built())]  # in a list: the actors get the ref, and fetch it in their constructor
        ds = ray.data.from_items([{"task": t.to_json()} for t in todo], override_num_blocks=min(len(todo), MAX_BLOCKS))
        launched = time.time()
        if loaders.count:
            ds = ds.map_batches(ShardLoader, fn_constructor_args=(blob, plan.manifest, plan.base, launched),
                                batch_size=1, compute=ray.data.ActorPoolStrategy(size=loaders.count),
                                **loaders.ray_options())
        load_from = None if loaders.count else (plan.manifest, plan.base)  # one process fewer on a few cores
        # calls > 1: Ray runs that many calls at once in each actor's threads
        threaded = {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True} if calls > 1 else {}
        ds = ds.map_batches(ShardWriter, fn_constructor_args=(blob, str(out), tcfg.batch_size, bound, launched, built,
                                                              load_from, calls),
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors, **threaded),
                            **encoders.ray_options())
        t0, done_before, placed = time.time(), len(stats), set()
        bar = Progress(len(todo), "[tokenize] shards", "shards", log)
        first = last = None
        after_first = 0  # samples done after the first shard came back: the steady-state rate
        for row in ds.iter_rows():  # each row: the stats of a shard its worker has written
            clock.lap("driver_startup" if first is None else "driver_wait")
            now = time.perf_counter()
            st = json.loads(row["stats"])
            clock.add(json.loads(row["timings"]))
            for k, v in json.loads(row["procs"]).items():  # each actor's latest
                if v["cpu"] >= procs.get(k, {"cpu": -1.0})["cpu"]:
                    procs[k] = v
            key = (st["split"], st["index"])
            stats[key] = st
            placed.add(row["placed"])
            if first is None:
                first = now
            else:
                after_first += st["samples"] + len(st["errors"])
            last = now
            written = len(stats) - done_before
            bar.update(written, lambda: f"[tokenize] {len(stats)}/{len(plan.tasks)} shards, last {key[0]}/"
                       f"{shard_set.tar_of(out, key).name}: {st['samples']} samples, {len(st['errors'])} errors "
                       f"({time.time() - t0:.1f}s, {bar.rate(written)})")
            clock.lap("driver_rows")
        clock.lap("driver_wait")  # the pipeline's end after the last row
        bar.close()
        steady = after_first / (last - first) if last > first else None
        log(f"[tokenize] tokenizer actors computed on: {'; '.join(sorted(placed))}")
    with clock("driver_finish"):
        summary, errors = shard_set.finish(out, stats, plan.read_errors, plan.per_task, ts, cfg_digest,
                                           tcfg.error_rate_ceiling)
    end = clock.read()
    timings = {"seconds": {**clock.take(), "total": [end[0] - start[0], end[1] - start[1]]},
               **actor_summary(procs),
               "shards_written": len(todo), "actors": actors, "calls_per_actor": calls, "loaders": loaders.count,
               "steady_samples_per_s": steady}
    log(f"[tokenize] done: {summary['samples']} samples in {len(plan.tasks)} shards, {len(errors)} errors -> "
        f"{out / 'index.json'}")
    warn = dropped_warning([e["reason"] for e in errors], summary["samples"] + len(errors), out / "errors.jsonl")
    if warn:
        log(f"[tokenize] {warn}")
    return {**summary, "timings": timings}
