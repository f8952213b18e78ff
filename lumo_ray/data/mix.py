"""Mixing tokenized shard sets for training (library, no Ray): `token_lm.shards` as a list of
{path, weight} sources.

Each source is read as a single shard set is (ShardDataset: a seeded order per epoch, split by rank,
sha256 checks). The source of a rank's n-th sample is drawn from the normalised weights by a generator
seeded with (seed, rank, n), so the mix is a function of the seed alone and its state is small: per
source the data position (epoch, position in the rank's order) and the samples taken from it (their
sum is the draw counter). A run resumed from that state draws the same sources in the same order as
the uninterrupted run. One source draws nothing: its stream and state are the plain shard stream's.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import UserError
from ..storage import locate
from ..token_space import TokenSpace, TokenSpaceMismatch
from .shard_reader import ShardDataset, open_shards
from .shards import load_index
from .task_mix import MODALITY

_DRAW = 5  # tag of the source draws in the seed key (the trainer's crop and task draws use others)


def sources(spec) -> list[tuple[str, float]]:
    """[(path, weight)] of `token_lm.shards`: a string is one source of weight 1; weights are normalised."""
    if isinstance(spec, (str, os.PathLike)):
        return [(str(spec), 1.0)] if str(spec) else []
    out = [(str(s.path), float(s.weight)) for s in spec]
    for i, (p, w) in enumerate(out):
        if not p:
            raise UserError(f"token_lm.shards[{i}]", None, "no path", "give each source a shard directory")
        if not (w >= 0 and math.isfinite(w)):
            raise UserError(f"token_lm.shards[{i}]", p, f"weight {w}", "weights are finite numbers >= 0")
    total = sum(w for _, w in out)
    if out and total <= 0:
        raise UserError("token_lm.shards", None, "every source has weight 0", "give at least one a positive weight")
    return [(p, w / total) for p, w in out]


def paths(spec) -> list[str]:
    return [p for p, _ in sources(spec)]


def check_sources(spec, expected: Optional[TokenSpace] = None) -> list[str]:
    """Refuse sources of different token spaces (one line naming both paths and both hashes), then a
    token space other than `expected`. Reads only each index.json; returns the paths."""
    ps = paths(spec)
    if not ps:
        raise UserError("token_lm.shards", None, "empty", "point it at a `lumo data tokenize` output (or a list of them)")
    hashes = [load_index(p)["token_space_hash"] for p in ps]
    for p, h in zip(ps[1:], hashes[1:]):
        if h != hashes[0]:
            raise TokenSpaceMismatch(f"token_lm.shards mixes token spaces: {ps[0]} has {hashes[0]}, {p} has {h}; "
                                     "tokenize every source with the run's uti config")
    if expected is not None:
        open_shards(ps[0], expected)  # names the first differing field of the token spaces
    return ps


def modalities(path: str) -> Optional[set[str]]:
    """Media modalities a shard set holds, from its summary.json task counts (None: unknown)."""
    f = locate(path) / "summary.json"
    if not f.exists():
        return None
    tasks = json.loads(f.read_text()).get("per_task", {})
    return {MODALITY[t] for t, n in tasks.items() if n > 0 and t in MODALITY}


def read_split(spec, split: str, *, rank: int = 0, world_size: int = 1, expected: Optional[TokenSpace] = None,
               ) -> list[dict]:
    """Every source's samples of `split` for this rank, source after source, in index order."""
    return [s for p in paths(spec) for s in ShardDataset(p, split, rank=rank, world_size=world_size, shuffle=False,
                                                          expected=expected)]


def sample_stream(ds: ShardDataset, epoch: int, pos: int, modality: Optional[str] = None,
                  ) -> Iterator[tuple[int, int, dict]]:
    """(epoch, position, sample) forever, starting at a recorded data position; with `modality`
    only the samples holding it (positions still count every sample of the rank's order)."""
    while True:
        ds.set_epoch(epoch)
        found = False
        for i, s in enumerate(ds):
            if modality is not None and modality not in s:
                continue
            found = True
            if i >= pos:
                yield epoch, i, s
        if modality is not None and not found:
            raise ValueError(f"the train split of {ds.dir} holds no {modality} samples for this rank, but a task "
                             f"that needs them has a positive weight (set its token_lm.mmpt.task_weights entry to 0)")
        epoch, pos = epoch + 1, 0


class MixStream:
    """A rank's samples drawn from several shard sets by weight, resumable from `state()`. `salt`
    keeps the draws of separate mixes of one run (one per modality under layouts='any') independent."""

    def __init__(self, datasets: Sequence[ShardDataset], weights: Sequence[float], seed: int, rank: int,
                 state=None, modality: Optional[str] = None, salt: int = 0):
        self.seed, self.rank, self.salt = seed, rank, salt
        self.cum = np.cumsum(weights) / sum(weights)
        entries = _entries(state, len(datasets))
        self.pos = [[e.get("epoch", 0), e.get("pos", 0)] for e in entries]
        self.seen = [int(e.get("seen", 0)) for e in entries]
        self.streams = [sample_stream(ds, *p, modality=modality) for ds, p in zip(datasets, self.pos)]

    def pick(self, n: int) -> int:
        """The source of this rank's n-th draw (0-based)."""
        if len(self.cum) == 1:
            return 0
        u = np.random.default_rng([self.seed, self.rank, n, _DRAW, self.salt]).random()
        return min(int(np.searchsorted(self.cum, u, side="right")), len(self.cum) - 1)

    def next(self) -> tuple[int, int, int, dict]:
        """(source, epoch, position, sample) of the next draw."""
        k = self.pick(sum(self.seen))
        epoch, i, s = next(self.streams[k])
        self.pos[k], self.seen[k] = [epoch, i + 1], self.seen[k] + 1
        return k, epoch, i, s

    def state(self) -> dict:
        ents = [{"epoch": e, "pos": p, "seen": n} for (e, p), n in zip(self.pos, self.seen)]
        return ents[0] if len(ents) == 1 else {"sources": ents}  # one source: the plain data position


def _entries(state, n: int) -> list[dict]:
    """Per-source positions of a recorded state (also the pre-mix forms {epoch, pos} and [epoch, pos])."""
    if not state:
        return [{} for _ in range(n)]
    if isinstance(state, (list, tuple)):
        state = {"epoch": state[0], "pos": state[1]}
    ents = state.get("sources", [state])
    if len(ents) != n:
        raise UserError("checkpoint data position", None, f"{len(ents)} shard sources, token_lm.shards has {n}",
                        "resume with the mix the run started with")
    return ents


def mix_report(spec, seen: Sequence[int]) -> dict:
    """The mix a run actually trained on: samples and share per source beside its weight."""
    total = sum(seen)
    return {"samples": int(total), "sources": [
        {"path": p, "weight": round(w, 6), "samples": int(n), "fraction": n / total if total else 0.0}
        for (p, w), n in zip(sources(spec), seen)]}


def primary(spec) -> str:
    """The shard set that evaluations reading one set use (modality ablation, fidelity, prompt gate,
    the export's loss check, the studies' slices): the only source, or the first of a mix."""
    ps = paths(spec)
    return ps[0] if ps else ""
