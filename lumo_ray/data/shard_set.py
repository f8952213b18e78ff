"""A tokenize output folder (library, no Ray): what a run writes around its shards.

`start` lays out config.yaml, source.json and the token space and removes a stale index (index.json
is present only when a run completed); `finished_shards` keeps what a re-run need not redo (inputs
and sha256 match); `write_shard` writes one tar and its stats as soon as its records are back;
`finish` writes errors.jsonl, summary.json and, last, index.json. Any location (storage.Loc): the
same bytes land on a path or an object store.
"""
from __future__ import annotations

import json
from collections import Counter

from ..config import LumoConfig, dump_config
from ..storage import Loc, check_output, locate
from ..token_space import TokenSpace
from .manifest import ErrorRecord, write_errors
from .shards import shard_is_complete, shard_name, stats_path, write_tar

Key = tuple[str, int]  # (split, shard index)


def start(out: Loc, cfg: LumoConfig, manifest, ts: TokenSpace) -> None:
    dump_config(cfg, out)
    for name in ("index.json", "index.json.tmp"):
        (out / name).unlink(missing_ok=True)
    # Where the records came from (verify re-tokenizes from it); kept out of index.json, which is location-free.
    (out / "source.json").write_text(json.dumps({"manifest": str(locate(manifest))}) + "\n")
    ts.save(out)


def tar_of(out: Loc, key: Key) -> Loc:
    return out / key[0] / shard_name(key[1])


def check_split_folders(out: Loc, keys) -> None:
    """Before any worker writes: each split folder must resolve inside `out` (a symlink planted at
    `<out>/train` is refused with one line, storage.UnsafeOutput)."""
    for split in sorted({k[0] for k in keys}):
        check_output(tar_of(out, (split, 0)))


def finished_shards(out: Loc, digests: dict[Key, str]) -> dict[Key, dict]:
    """The stats of every shard already written for these inputs; half-written ones are removed."""
    stats = {}
    for key, digest in sorted(digests.items()):
        tar = tar_of(out, key)
        tar.with_name(tar.name + ".tmp").unlink(missing_ok=True)
        st = shard_is_complete(tar, digest)
        if st:
            stats[key] = st
    return stats


def write_shard(out: Loc, key: Key, results: list[dict], sources: dict[str, str], digest: str) -> dict:
    """The tar of one shard (its samples in plan order) and its stats, with an error entry per record
    that failed to load or encode (naming its source dataset). Run by the worker that tokenized it."""
    st = write_tar(tar_of(out, key), [r["members"] for r in results if "members" in r])
    st.update(split=key[0], index=key[1], input_digest=digest,
              errors=[ErrorRecord(id=r["id"], stage=r["error"]["stage"], reason=r["error"]["reason"],
                                  source=sources.get(r["id"], ""), detail=r["error"].get("detail", "")).to_dict()
                      for r in results if "error" in r])
    stats_path(tar_of(out, key)).write_text(json.dumps(st, indent=1, sort_keys=True) + "\n")
    return st


def finish(out: Loc, stats: dict[Key, dict], read_errors: list[ErrorRecord], per_task: Counter,
           ts: TokenSpace, cfg_digest: str, ceiling: float) -> tuple[dict, list[dict]]:
    """errors.jsonl, summary.json, then index.json; raises when the error rate exceeds `ceiling`
    (every file but the index written). Returns (summary, errors)."""
    keys = sorted(stats)
    errors = [e.to_dict() for e in read_errors] + [e for k in keys for e in stats[k]["errors"]]
    write_errors([ErrorRecord(**e) for e in errors], out / "errors.jsonl")
    n_ok = sum(stats[k]["samples"] for k in keys)
    n_all = n_ok + len(errors)
    rate = len(errors) / n_all if n_all else 0.0
    summary = {"samples": n_ok, "errors": len(errors), "error_rate": rate,
               "per_split": {s: sum(stats[k]["samples"] for k in keys if k[0] == s) for s in sorted({k[0] for k in keys})},
               "per_task": dict(sorted(per_task.items())),
               "error_reasons": dict(Counter(e["reason"] for e in errors).most_common())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if rate > ceiling:
        top = ", ".join(f"{r} ({c})" for r, c in Counter(e["reason"] for e in errors).most_common(3))
        raise RuntimeError(f"tokenize: error rate {rate:.1%} exceeds the ceiling {ceiling:.1%}; "
                           f"top reasons: {top} (see {out / 'errors.jsonl'})")
    index = {"token_space_hash": ts.hash, "config_digest": cfg_digest,
             "shards": [{"split": k[0], "name": f"{k[0]}/{shard_name(k[1])}", "samples": stats[k]["samples"],
                         "bytes": stats[k]["bytes"], "sha256": stats[k]["sha256"]} for k in keys],
             "totals": {"shards": len(keys), "samples": n_ok, "bytes": sum(stats[k]["bytes"] for k in keys),
                        "per_split": summary["per_split"]}}
    (out / "index.json").write_atomic(json.dumps(index, indent=2, sort_keys=True) + "\n")  # written last
    return summary, errors
