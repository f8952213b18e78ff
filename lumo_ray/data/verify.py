"""Data verify (docs/gates.md): every record's range / shape / phase / dtype / hash checks, leakage,
length statistics and drift. Library code; pipelines/verify.py fans the shard checks out on Ray.
Shards may sit on a local path or an object store (lumo_ray.storage): each is read once, as a
stream, and hashed while its records are checked."""
from __future__ import annotations

import tarfile
from collections import defaultdict

import numpy as np

from ..storage import PathLike, locate
from ..token_space import TokenSpace
from .shards import HashingReader, iter_tar, token_dtype

FIELD_MODALITY = {"text": "text", "prompt": "text", "image": "image", "audio": "audio"}
MAX_LISTED = 20


def check_sample(s: dict, ts: TokenSpace, dtype: np.dtype) -> list[str]:
    """Problems with one stored sample (empty list when it is good)."""
    meta = s.get("json")
    if not isinstance(meta, dict):
        return ["no JSON member"]
    probs = []
    if meta.get("token_space_hash") != ts.hash:
        probs.append(f"token-space hash {meta.get('token_space_hash')} != {ts.hash}")
    lengths = meta.get("lengths", {})
    for name, arr in s.items():
        if name in ("__key__", "json"):
            continue
        if name not in FIELD_MODALITY:
            probs.append(f"unexpected member {name}")
            continue
        if not isinstance(arr, np.ndarray) or arr.ndim != 1:
            probs.append(f"{name}: not a 1-D array")
            continue
        if arr.dtype != dtype:
            probs.append(f"{name}: dtype {arr.dtype} != {dtype}")
        if lengths.get(name) != arr.size:
            probs.append(f"{name}: length {arr.size} != recorded {lengths.get(name)}")
        mod = FIELD_MODALITY[name]
        if mod == "audio" and arr.size % ts.num_codebooks:
            probs.append(f"audio: length {arr.size} not a multiple of {ts.num_codebooks} codebooks")
        bad = ts.check_ids(arr.astype(np.int64), mod) if arr.size else []
        if bad:
            what = "codebook phase/range" if mod == "audio" else f"{mod} range"
            probs.append(f"{name}: {len(bad)} id(s) outside {what}, first at {bad[0]} (id {int(arr[bad[0]])})")
        if mod == "image" and ts.has_image:
            tpi = ts.adapters["image"]["tokens_per_image"]
            if arr.size != tpi:
                probs.append(f"image: {arr.size} tokens != {tpi} per image")
    for name in lengths:
        if name not in s:
            probs.append(f"{name}: recorded but missing")
    return probs


def check_shard(path: PathLike, ts_json: dict, expected_sha: str, expected_samples: int) -> dict:
    """Every record of one shard: integrity, per-sample problems, ids/groups per split, lengths."""
    ts = TokenSpace.from_json(ts_json)
    dtype = token_dtype(ts.total)
    loc = locate(path)
    res = {"shard": str(path), "problems": [], "samples": 0, "bad_samples": 0, "ids": [], "lengths": []}
    if not loc.exists():
        res["problems"].append(f"{path}: missing")
        return res
    with loc.open_read() as raw:
        fh = HashingReader(raw)  # one pass: the records are checked and the bytes hashed together
        try:
            for s in iter_tar(fh):
                res["samples"] += 1
                meta = s.get("json") or {}
                sid = meta.get("id", s["__key__"])
                probs = check_sample(s, ts, dtype)
                if probs:
                    res["bad_samples"] += 1
                    res["problems"].append(f"{sid}: " + "; ".join(probs))
                res["ids"].append((sid, meta.get("group"), meta.get("split")))
                res["lengths"].append((meta.get("task"), {k: int(v.size) for k, v in s.items()
                                                          if isinstance(v, np.ndarray)}))
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            res["problems"].append(f"{path}: unreadable ({type(e).__name__}: {e})")
        sha = fh.drain()
    if sha != expected_sha:
        res["problems"].insert(0, f"{path}: sha256 {sha[:16]}... != index {expected_sha[:16]}...")
    if res["samples"] != expected_samples:
        res["problems"].append(f"{path}: {res['samples']} samples != index {expected_samples}")
    return res


def leakage(ids: list[tuple]) -> dict:
    """Ids and groups in both splits, and duplicate ids. A record without a group is its own group
    (named 'id:<id>'), so no record is left out of the group check."""
    by_split: dict[str, dict[str, set]] = defaultdict(lambda: {"ids": set(), "groups": set()})
    for sid, group, split in ids:
        by_split[split]["ids"].add(sid)
        by_split[split]["groups"].add(group if group is not None else f"id:{sid}")
    tr, ev = by_split.get("train", {"ids": set(), "groups": set()}), by_split.get("eval", {"ids": set(), "groups": set()})
    seen, dup = set(), set()
    for sid, _, _ in ids:
        (dup if sid in seen else seen).add(sid)
    return {"ids_in_both": sorted(tr["ids"] & ev["ids"])[:MAX_LISTED],
            "groups_in_both": sorted(tr["groups"] & ev["groups"])[:MAX_LISTED],
            "duplicate_ids": sorted(dup)[:MAX_LISTED]}


def length_stats(lengths: list[tuple[str, dict]]) -> dict:
    """Per task and field: n, p50, p90, p99, max."""
    acc: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for task, ls in lengths:
        for k, v in ls.items():
            acc[task or "?"][k].append(v)
    return {t: {k: {"n": len(v), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
                    "p99": float(np.percentile(v, 99)), "max": int(max(v))} for k, v in sorted(f.items())}
            for t, f in sorted(acc.items())}


def drift(stats: dict, base: dict, tol: float) -> list[str]:
    """Fields whose p50/p90/max moved by more than `tol` (relative), or that appeared/disappeared."""
    out = []
    for t in sorted(set(stats) | set(base)):
        for k in sorted(set(stats.get(t, {})) | set(base.get(t, {}))):
            a, b = stats.get(t, {}).get(k), base.get(t, {}).get(k)
            if a is None or b is None:
                out.append(f"{t}.{k}: {'new' if b is None else 'gone'}")
                continue
            for q in ("p50", "p90", "max"):
                if abs(a[q] - b[q]) > tol * max(abs(b[q]), 1e-9):
                    out.append(f"{t}.{k}.{q}: {b[q]} -> {a[q]}")
    return out
