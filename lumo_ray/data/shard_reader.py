"""Reading tokenized shards for training: deterministic order for (seed, epoch), split by rank and
worker, and the same number of samples on every rank (no DDP hang on uneven shards).

The order is a seeded permutation of every (shard, position) in the split, taken from index.json.
Each rank takes every world_size-th sample of that permutation, padded by wrapping around so all
ranks get ceil(N / world_size); each DataLoader worker then takes every num_workers-th of those.
Each shard's bytes are checked against its sha256 in index.json as it is read (a changed shard is
refused, by name). The shard directory may be a local path or an object-store URI (lumo_ray.storage).
"""
from __future__ import annotations

import json
import math
from typing import Iterator

import numpy as np
import torch

from ..storage import PathLike, locate
from ..token_space import TokenSpace
from .shards import load_index, read_verified


def open_shards(shards_dir: PathLike, expected: TokenSpace | None = None) -> dict:
    """index.json of a shard directory, after refusing a token space other than `expected`."""
    shards_dir = locate(shards_dir)
    index = load_index(shards_dir)
    if expected is not None:
        if index["token_space_hash"] != expected.hash:
            tsj = shards_dir / "token_space.json"
            theirs = TokenSpace.from_json(json.loads(tsj.read_text())) if tsj.exists() else None
            if theirs is not None:
                expected.ensure_same(theirs, what=f"shards {shards_dir} token space")
            raise ValueError(f"shards {shards_dir} have token space {index['token_space_hash']}, run has {expected.hash}")
    return index


def rank_order(counts: list[int], seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True) -> list[tuple[int, int]]:
    """(shard, position) pairs this rank reads, in order; every rank gets the same count."""
    pairs = [(s, p) for s, n in enumerate(counts) for p in range(n)]
    if not pairs:
        return []
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(pairs))
        pairs = [pairs[i] for i in perm]
    per_rank = math.ceil(len(pairs) / world_size)
    padded = (pairs * math.ceil(per_rank * world_size / len(pairs)))[: per_rank * world_size]
    return padded[rank::world_size]


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples ({'json', 'text', 'prompt'?, 'image'?, 'audio'?} as int64 arrays) of one split."""

    def __init__(self, shards_dir: PathLike, split: str, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, expected: TokenSpace | None = None):
        self.dir = locate(shards_dir)
        self.index = open_shards(self.dir, expected)
        self.shards = [s for s in self.index["shards"] if s["split"] == split]
        self.split, self.seed, self.rank, self.world_size, self.shuffle = split, seed, rank, world_size, shuffle
        self.expected_hash = self.index["token_space_hash"]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[tuple[int, int]]:
        return rank_order([s["samples"] for s in self.shards], self.seed, self.epoch, self.rank, self.world_size,
                          self.shuffle)

    def __len__(self) -> int:
        return math.ceil(sum(s["samples"] for s in self.shards) / self.world_size)

    def __iter__(self) -> Iterator[dict]:
        order = self.order()
        info = torch.utils.data.get_worker_info()
        if info is not None:
            order = order[info.id::info.num_workers]
        cache: dict[int, list[dict]] = {}
        for s, p in order:
            if s not in cache:
                cache[s] = [self._check(x) for x in read_verified(self.dir, self.shards[s])]
            yield cache[s][p]

    def _check(self, sample: dict) -> dict:
        h = sample["json"].get("token_space_hash")
        if h != self.expected_hash:
            raise ValueError(f"sample {sample['json'].get('id')} has token space {h}, shards index has {self.expected_hash}")
        return {k: (v.astype(np.int64) if isinstance(v, np.ndarray) else v) for k, v in sample.items()}
