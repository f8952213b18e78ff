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
import yaml

from lumo_ray.config import LumoConfig, to_dict
from lumo_ray.data.manifest import ErrorRecord, dropped_warning, read_manifest, write_errors
from lumo_ray.data.shards import shard_is_complete, shard_name, stats_path, write_tar
from lumo_ray.data.tokenize import (SampleTokenizer, plan_shards, plan_units, shard_input_digest,
                                    tokenize_config_digest)
from lumo_ray.runtime import Progress, rate_eta
from lumo_ray.storage import Loc, PathLike, locate

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


def _error(r: dict, source: str = "") -> dict:
    e = r["error"]
    return ErrorRecord(id=r["id"], stage=e["stage"], reason=e["reason"], source=source, detail=e.get("detail", "")).to_dict()


def dump_config_at(cfg: LumoConfig, out: Loc) -> None:
    """config.yaml, byte for byte as `dump_config` writes it, on any storage."""
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def run_tokenize(manifest: PathLike, cfg: LumoConfig, out_dir: PathLike, actors: int | None = None,
                 address: str | None = None, log=print) -> dict:
    """Tokenize a manifest into `<out>/<split>/shard-NNNNNN.tar` + errors.jsonl + summary.json + index.json."""
    out = locate(out_dir)
    tcfg = cfg.data.tokenize
    actors = actors or tcfg.actors
    records, read_errors = read_manifest(manifest)  # a missing manifest fails before anything is written
    dump_config_at(cfg, out)
    for name in ("index.json", "index.json.tmp"):  # index.json is present only when this run completes
        (out / name).unlink(missing_ok=True)
    # Where the records came from (verify re-tokenizes from it); kept out of index.json, which is location-free.
    (out / "source.json").write_text(json.dumps({"manifest": str(locate(manifest))}) + "\n")
    ts = SampleTokenizer(cfg.uti).ts
    (out / "token_space.json").write_text(json.dumps(ts.to_json(), indent=2) + "\n")  # as TokenSpace.save
    (out / "token_space.sha256").write_text(ts.hash + "\n")
    cfg_digest = tokenize_config_digest(cfg.uti, tcfg.shard_size, ts.hash, tcfg.batch_size)
    plan = plan_shards(records, tcfg.shard_size)
    keys = sorted(plan)
    digests = {k: shard_input_digest(plan[k], cfg_digest) for k in keys}

    # Resume: keep finished shards (inputs and sha256 match), redo everything else.
    stats: dict[tuple[str, int], dict] = {}
    for key in keys:
        tar = out / key[0] / shard_name(key[1])
        tar.with_name(tar.name + ".tmp").unlink(missing_ok=True)
        st = shard_is_complete(tar, digests[key])
        if st:
            stats[key] = st
    todo = [k for k in keys if k not in stats]
    log(f"[tokenize] {len(records)} records -> {len(keys)} shards ({len(stats)} complete, {len(todo)} to write), "
        f"{actors} tokenizer actor(s), token space {ts.hash[:12]}")

    if todo:
        init_ray(address)
        blob = pickle.dumps(cfg.uti)
        units = []
        for sid, key in enumerate(todo):
            for u, chunk in enumerate(plan_units(plan[key], tcfg.batch_size)):
                units.append({"shard": sid, "unit": u, "records": json.dumps([r.to_dict() for r in chunk])})
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
        for row in ds.iter_rows():
            sid = int(row["shard"])
            got = pending.setdefault(sid, {})
            got[int(row["unit"])] = pickle.loads(row["results"])
            if len(got) < expected[sid]:
                continue
            results = [r for u in sorted(pending.pop(sid)) for r in got[u]]
            key = todo[sid]
            tar = out / key[0] / shard_name(key[1])
            st = write_tar(tar, [r["members"] for r in results if "members" in r])
            src = {r.id: r.source for r in plan[key]}
            st.update(split=key[0], index=key[1], input_digest=digests[key],
                      errors=[_error(r, src.get(r["id"], "")) for r in results if "error" in r])
            stats_path(tar).write_text(json.dumps(st, indent=1, sort_keys=True) + "\n")
            stats[key] = st
            written = len(stats) - done_before
            bar.update(written, lambda: f"[tokenize] {len(stats)}/{len(keys)} shards, last {key[0]}/{tar.name}: "
                       f"{st['samples']} samples, {len(st['errors'])} errors ({time.time() - t0:.1f}s, "
                       f"{rate_eta(written, len(todo), t0, unit='shards')})")  # a line per tenth, not per shard
        bar.close()

    errors = [e.to_dict() for e in read_errors] + [e for k in keys for e in stats[k]["errors"]]
    write_errors([ErrorRecord(**e) for e in errors], out / "errors.jsonl")
    n_ok = sum(stats[k]["samples"] for k in keys)
    n_all = n_ok + len(errors)
    rate = len(errors) / n_all if n_all else 0.0
    summary = {"samples": n_ok, "errors": len(errors), "error_rate": rate,
               "per_split": {s: sum(stats[k]["samples"] for k in keys if k[0] == s) for s in sorted({k[0] for k in keys})},
               "per_task": dict(sorted(Counter(r.task for r in records).items())),
               "error_reasons": dict(Counter(e["reason"] for e in errors).most_common())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if rate > tcfg.error_rate_ceiling:
        top = ", ".join(f"{r} ({c})" for r, c in Counter(e["reason"] for e in errors).most_common(3))
        raise RuntimeError(f"tokenize: error rate {rate:.1%} exceeds the ceiling {tcfg.error_rate_ceiling:.1%}; "
                           f"top reasons: {top} (see {out / 'errors.jsonl'})")
    index = {"token_space_hash": ts.hash, "config_digest": cfg_digest,
             "shards": [{"split": k[0], "name": f"{k[0]}/{shard_name(k[1])}", "samples": stats[k]["samples"],
                         "bytes": stats[k]["bytes"], "sha256": stats[k]["sha256"]} for k in keys],
             "totals": {"shards": len(keys), "samples": n_ok, "bytes": sum(stats[k]["bytes"] for k in keys),
                        "per_split": summary["per_split"]}}
    (out / "index.json").write_atomic(json.dumps(index, indent=2, sort_keys=True) + "\n")  # written last
    log(f"[tokenize] done: {n_ok} samples in {len(keys)} shards, {len(errors)} errors -> {out / 'index.json'}")
    warn = dropped_warning([e["reason"] for e in errors], n_all, out / "errors.jsonl")
    if warn:
        log(f"[tokenize] {warn}")
    return summary
