"""Train/eval split as a pure function of the group key (docs/stage2_data.md), plus the leakage audit.

Rule: a group is eval iff int(sha256(group), 16) % 1000 < eval_permille. Adding or removing other
samples never moves a group. Minimum eval size: when the rule gives fewer than `min_eval` eval
groups, the train groups with the smallest full hash value move to eval (deterministic; with
enough data the rule alone already meets the minimum and nothing moves). At least one group is
always left in train.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Iterable

from .manifest import Record


def group_hash(group: str) -> int:
    return int(hashlib.sha256(group.encode("utf-8")).hexdigest(), 16)


def hash_split(group: str, eval_permille: int) -> str:
    """The split of one group under the hash rule alone."""
    return "eval" if group_hash(group) % 1000 < eval_permille else "train"


def assign_splits(groups: Iterable[str], eval_permille: int, min_eval: int = 0) -> dict[str, str]:
    """group -> 'train' | 'eval' for a set of groups (order and duplicates do not matter)."""
    if not 0 <= eval_permille <= 1000:
        raise ValueError(f"eval_permille must be in [0, 1000], got {eval_permille}")
    uniq = sorted(set(groups))
    out = {g: hash_split(g, eval_permille) for g in uniq}
    n_eval = sum(s == "eval" for s in out.values())
    want = min(min_eval, max(len(uniq) - 1, 0))  # keep train non-empty
    if n_eval < want:
        train = sorted((g for g in uniq if out[g] == "train"), key=lambda g: (group_hash(g), g))
        for g in train[: want - n_eval]:
            out[g] = "eval"
    return out


def apply_splits(records: list[Record], eval_permille: int, min_eval: int = 0) -> list[Record]:
    """Set `split` on every record from its group (in place; also returned)."""
    splits = assign_splits((r.group for r in records), eval_permille, min_eval)
    for r in records:
        r.split = splits[r.group]
    return records


def check_leakage(records: Iterable[Record]) -> dict:
    """Ids and groups that appear in both splits (must be empty), and duplicate ids."""
    ids: dict[str, set] = defaultdict(set)
    groups: dict[str, set] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        ids[r.id].add(r.split)
        groups[r.group].add(r.split)
        counts[r.id] += 1
    both = {"train", "eval"}
    ids_both = sorted(i for i, s in ids.items() if both <= s)
    groups_both = sorted(g for g, s in groups.items() if both <= s)
    dup = sorted(i for i, c in counts.items() if c > 1)
    return {"ok": not (ids_both or groups_both or dup), "ids_in_both": ids_both,
            "groups_in_both": groups_both, "duplicate_ids": dup}
