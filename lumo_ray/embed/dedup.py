"""Semantic curation of a manifest from its CLIP embeddings (library, no Ray): exact duplicates by content
hash, near-duplicates by image-embedding cosine, and the caption-image agreement filter.

Near-duplicates: the L2-normalised image embeddings (each record's own: no dataset statistic, so a
record's fate depends only on the records it resembles) are bucketed by k-means (about `bucket_size`
rows a bucket), and within each bucket every pair at cosine >= threshold is linked;
each linked group keeps its smallest id. Pairs split across buckets are not compared (SemDedup's
trade: pairwise work stays bucket-sized). Every dropped record is written with its reason, nothing
is dropped silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..codecs import kmeans as K


@dataclass
class Curation:
    keep: list[str]
    groups: list[dict] = field(default_factory=list)  # {"kept", "dropped": [...], "similarity": [...], "kind"}
    low_score: list[dict] = field(default_factory=list)  # {"id", "score"}


def unit(X: np.ndarray) -> np.ndarray:
    Y = X.astype(np.float64)
    return Y / np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)


def exact_groups(ids: list[str], hashes: dict[str, str], group: dict[str, str]) -> list[dict]:
    """Records whose image bytes are identical: the smallest id of each hash is kept, with the other
    records of its group (another caption of the same item is not a duplicate, as in normalize)."""
    by: dict[str, list[str]] = {}
    for i in sorted(ids):
        if hashes.get(i):
            by.setdefault(hashes[i], []).append(i)
    out = []
    for g in by.values():
        drop = [i for i in g[1:] if group.get(i, i) != group.get(g[0], g[0])]
        if drop:
            out.append({"kept": g[0], "dropped": drop, "similarity": [1.0] * len(drop), "kind": "exact"})
    return out


def near_groups(ids: list[str], X: np.ndarray, threshold: float, bucket_size: int = 2048, seed: int = 0,
                group: dict[str, str] | None = None) -> list[dict]:
    """Groups of rows linked by cosine >= threshold within k-means buckets; two
    records of one group (the same item) are never linked."""
    group = group or {}
    if len(ids) < 2:
        return []
    order = np.argsort(np.asarray(ids))  # id order: the result does not depend on the input order
    ids = [ids[i] for i in order]
    Y = unit(X[order])
    k = max(1, math.ceil(len(ids) / bucket_size))
    if k > 1:
        C = K.fit(Y, k, seed, lambda c: [K.partial(Y, c)], max_iter=20).centers
        lab = K.assign(Y, C)
    else:
        lab = np.zeros(len(ids), np.int64)
    parent = list(range(len(ids)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    best: dict[int, float] = {}
    for b in np.unique(lab):
        idx = np.flatnonzero(lab == b)
        S = Y[idx] @ Y[idx].T
        rows, cols = np.nonzero(np.triu(S >= threshold, 1))
        for r, c in zip(rows, cols):
            i, j = int(idx[r]), int(idx[c])
            if group.get(ids[i], ids[i]) == group.get(ids[j], ids[j]):
                continue
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)  # the root is the smallest index: the smallest id
            best[j] = max(best.get(j, -1.0), float(S[r, c]))
    groups: dict[int, list[int]] = {}
    for i in range(len(ids)):
        groups.setdefault(find(i), []).append(i)
    out = []
    for root, members in sorted(groups.items()):
        if len(members) > 1:
            dropped = [m for m in members if m != root]
            out.append({"kept": ids[root], "dropped": [ids[m] for m in dropped],
                        "similarity": [round(float(Y[root] @ Y[m]), 6) for m in dropped], "kind": "near"})
    return out


def curate(ids: list[str], image: np.ndarray, text: np.ndarray, hashes: dict[str, str], threshold: float = 0.95,
           min_clip_score: float | None = None, bucket_size: int = 2048, seed: int = 0,
           group: dict[str, str] | None = None) -> Curation:
    """Exact duplicates first (content hash), then near-duplicates among what is left, then the
    caption-image agreement filter (cosine of the image and caption embeddings) on the survivors.
    group: each id's manifest group (records of one group are never duplicates of each other)."""
    pos = {i: n for n, i in enumerate(ids)}
    group = group or {}
    groups = exact_groups(ids, hashes, group)
    gone = {d for g in groups for d in g["dropped"]}
    rest = [i for i in ids if i not in gone]
    near = near_groups(rest, image[[pos[i] for i in rest]], threshold, bucket_size, seed, group) if threshold <= 1 else []
    groups += near
    gone |= {d for g in near for d in g["dropped"]}
    low = []
    if min_clip_score is not None:
        for i in ids:
            if i not in gone:
                s = float(image[pos[i]] @ text[pos[i]])
                if s < min_clip_score:
                    low.append({"id": i, "score": round(s, 6)})
        gone |= {x["id"] for x in low}
    return Curation([i for i in ids if i not in gone], groups, low)


def run_dedup(embeddings, manifest, out_dir, threshold: float = 0.95, min_clip_score: float | None = None,
              bucket_size: int = 2048, log=print) -> dict:
    """`lumo data dedup`: <out>/manifest.jsonl (the kept records; records without an embedding pass
    through), duplicates.jsonl (kept id, dropped ids, similarity), errors.jsonl (each dropped record,
    its reason and score) and summary.json."""
    import json

    from ..data.manifest import ErrorRecord, read_manifest, require_manifest, write_errors, write_jsonl, write_manifest
    from ..storage import locate
    from .parts import read_embeddings

    require_manifest(manifest)
    out = locate(out_dir)
    recs, read_errors = read_manifest(manifest)
    emb = read_embeddings(embeddings)
    by_id = {r.id: r for r in recs}
    known = [i for i in emb.ids if i in by_id]
    pos = {i: n for n, i in enumerate(emb.ids)}
    idx = [pos[i] for i in known]
    hashes = {i: ((by_id[i].meta.get("probe") or {}).get("image") or {}).get("sha256", "") for i in known}
    cur = curate(known, emb.image[idx], emb.text[idx], hashes, threshold, min_clip_score, bucket_size,
                 group={i: by_id[i].group for i in known})
    dropped = set(known) - set(cur.keep)
    kept = [r for r in recs if r.id not in dropped]
    write_manifest(kept, out / "manifest.jsonl")
    write_jsonl(cur.groups, out / "duplicates.jsonl", key="kept")
    errs = [ErrorRecord(id=d, stage="dedup", reason=f"{g['kind']} duplicate", source=by_id[d].source,
                        detail=f"duplicate of {g['kept']} (cosine {s:.4f})" if g["kind"] == "near"
                        else f"duplicate of {g['kept']} (same image bytes)")
            for g in cur.groups for d, s in zip(g["dropped"], g["similarity"])]
    errs += [ErrorRecord(id=x["id"], stage="dedup", reason="low clip score", source=by_id[x["id"]].source,
                         detail=f"caption-image cosine {x['score']:.4f} < {min_clip_score}") for x in cur.low_score]
    write_errors(sorted(errs, key=lambda e: e.id), out / "errors.jsonl")
    summary = {"records": len(recs), "kept": len(kept), "embedded": len(known), "not_embedded": len(recs) - len(known),
               "exact_duplicates": sum(len(g["dropped"]) for g in cur.groups if g["kind"] == "exact"),
               "near_duplicates": sum(len(g["dropped"]) for g in cur.groups if g["kind"] == "near"),
               "low_clip_score": len(cur.low_score), "threshold": threshold, "min_clip_score": min_clip_score,
               "manifest_read_errors": len(read_errors)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"[dedup] {summary['records']} records: kept {summary['kept']}, dropped {summary['exact_duplicates']} exact "
        f"and {summary['near_duplicates']} near duplicates (cosine >= {threshold}), {summary['low_clip_score']} below "
        f"the clip score {min_clip_score}; {summary['not_embedded']} without an embedding kept -> {out / 'manifest.jsonl'}")
    return summary
