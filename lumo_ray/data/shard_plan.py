"""The streaming shard plan (library, no Ray): which manifest records make which shard, computed in
one pass that holds one open shard per split, never the whole manifest.

Shards take the records of a split in id order (tokenize.plan_shards is the in-memory statement of
the same rule). A manifest sorted by id — what `normalize` and `write_manifest` write — is read as
it streams: a shard is a byte range of the manifest plus its split, and the worker that writes the
shard reads that range itself, so records never pass through the driver. A manifest out of id
order is sorted in memory once into `<out>/manifest.sorted.jsonl` (resolved records) and planned
from there. Lines split at `\\n` (a `\\r\\n` ending is whitespace to the JSON parser).
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..storage import Loc, PathLike, locate
from .manifest import ErrorRecord, Record, _dumps, manifest_base, parse_line

CHUNK = 8 << 20


def digest_start(config_digest: str):
    return hashlib.sha256(config_digest.encode())


def digest_add(h, rec: Record) -> None:
    h.update(json.dumps(rec.to_dict(), sort_keys=True).encode())


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its records are the `split` records within manifest bytes [start, end)."""
    split: str
    index: int
    start: int
    end: int
    records: int
    digest: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.split, self.index)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "ShardTask":
        return cls(**json.loads(s))


@dataclass
class Plan:
    tasks: list[ShardTask]
    read_errors: list[ErrorRecord]
    per_task: Counter
    records: int
    manifest: str            # the manifest the byte ranges point into
    base: Optional[str]      # where its relative media paths resolve
    sorted_copy: bool = False


def iter_lines(loc: Loc) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line incl. its newline) of a file, read in chunks (local or object store)."""
    off, rest = 0, b""
    with loc.open_read() as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                break
            buf = rest + chunk
            lines = buf.split(b"\n")
            rest = lines.pop()
            for ln in lines:
                yield off, ln + b"\n"
                off += len(ln) + 1
    if rest:
        yield off, rest


def _text(raw: bytes) -> str:
    """A line as a text-mode reader gives it (`\r\n` -> `\n`), so errors quote the same positions."""
    t = raw.decode("utf-8")
    return t[:-2] + "\n" if t.endswith("\r\n") else t


class Unsorted(Exception):
    pass


def _scan(loc: Loc, base: Optional[Path], shard_size: int, config_digest: str) -> Plan:
    tasks: list[ShardTask] = []
    errors: list[ErrorRecord] = []
    per_task: Counter = Counter()
    open_: dict[str, dict] = {}  # split -> {index, start, end, n, h}
    next_index: Counter = Counter()
    prev, n_rec = None, 0

    def close(split: str) -> None:
        s = open_.pop(split)
        tasks.append(ShardTask(split, s["index"], s["start"], s["end"], s["n"], s["h"].hexdigest()))

    for n, (off, raw) in enumerate(iter_lines(loc), start=1):
        rec, err = parse_line(_text(raw), n, loc, base)
        if err is not None:
            errors.append(err)
        if rec is None:
            continue
        if prev is not None and rec.id < prev:
            raise Unsorted(f"{loc}: line {n}: id {rec.id!r} sorts before {prev!r}")
        prev, n_rec = rec.id, n_rec + 1
        per_task[rec.task] += 1
        split = rec.split or "train"
        s = open_.get(split)
        if s is None:
            s = open_[split] = {"index": next_index[split], "start": off, "n": 0, "h": digest_start(config_digest)}
            next_index[split] += 1
        digest_add(s["h"], rec)
        s["n"] += 1
        s["end"] = off + len(raw)
        if s["n"] == shard_size:
            close(split)
    for split in sorted(open_):
        close(split)
    tasks.sort(key=lambda t: t.key)
    return Plan(tasks, errors, per_task, n_rec, str(loc), str(base) if base is not None else None)


def plan_manifest(manifest: PathLike, shard_size: int, config_digest: str, out: Loc,
                  root: str | Path | None = None, log=print) -> Plan:
    """The plan of a manifest; an unsorted one is first sorted into `<out>/manifest.sorted.jsonl`."""
    loc = locate(manifest)
    base = manifest_base(loc, root)
    try:
        return _scan(loc, base, shard_size, config_digest)
    except Unsorted as e:
        log(f"[tokenize] the manifest is not sorted by id ({e}): sorting it in memory into "
            f"{out / 'manifest.sorted.jsonl'} (`lumo data normalize` writes sorted manifests)")
    from .manifest import read_manifest

    records, errors = read_manifest(loc, root)
    copy = out / "manifest.sorted.jsonl"
    copy.write_atomic("".join(_dumps(r.to_dict()) + "\n" for r in sorted(records, key=lambda r: r.id)))
    plan = _scan(copy, None, shard_size, config_digest)
    plan.read_errors, plan.sorted_copy = errors, True
    return plan


def shard_records(task: ShardTask, manifest: PathLike, base: Optional[str]) -> list[Record]:
    """The records of one shard, read from its byte range of the manifest (by the worker writing it)."""
    loc = locate(manifest)
    data = loc.read_range(task.start, task.end - task.start)
    recs = []
    for line in io.BytesIO(data):
        rec, _ = parse_line(_text(line), 0, loc, Path(base) if base else None)
        if rec is not None and (rec.split or "train") == task.split:
            recs.append(rec)
    if len(recs) != task.records:
        raise RuntimeError(f"{loc}: bytes {task.start}-{task.end} hold {len(recs)} {task.split} records, the plan "
                           f"{task.records}: the manifest changed while tokenizing")
    return recs
