"""Manifest schema (docs/stage2_data.md): one JSON object per line, one sample per line.

Fields: `id` (stable, from the source's own keys), `source`, `group` (never straddles train/eval),
`task` ('a2t', 'i2t', 't2a', 't2i', 't'), `modalities` ({"image": {"path": ...}} and/or
{"audio": {"path": ...}}), `text` ({"prompt", "caption"}), `split` ('train' / 'eval', or None
before splitting), `meta` (source keys, probe results).

Paths: readers and `normalize` store **absolute** media paths, so a manifest stays usable when it is
written to (or copied into) another directory. A hand-written manifest may hold relative paths:
`read_manifest` resolves them against `root` (default: the manifest file's own directory).
Manifests and error files may live on an object store (lumo_ray.storage URIs), and so may the media
they name: a media path may be an `s3://` / `gs://` URI (codecs.base.media_file fetches it).

Files are written sorted by id with sorted keys and fixed separators: same records -> same bytes.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..storage import PathLike, is_uri, locate, where

TASKS = ("a2t", "i2t", "t2a", "t2i", "t")
SPLITS = ("train", "eval")
MODALITIES = ("image", "audio")
# Which media a task needs (the text side is always required).
TASK_MEDIA = {"a2t": ("audio",), "t2a": ("audio",), "i2t": ("image",), "t2i": ("image",), "t": ()}
REQUIRED = ("id", "source", "group", "task", "modalities", "text")


@dataclass
class Record:
    id: str
    source: str
    group: str
    task: str
    modalities: dict = field(default_factory=dict)
    text: dict = field(default_factory=lambda: {"prompt": "", "caption": ""})
    split: Optional[str] = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(id=d["id"], source=d["source"], group=d["group"], task=d["task"],
                   modalities=dict(d.get("modalities") or {}), text=dict(d.get("text") or {}),
                   split=d.get("split"), meta=dict(d.get("meta") or {}))

    def media_path(self, modality: str) -> Optional[str]:
        m = self.modalities.get(modality)
        return m.get("path") if isinstance(m, dict) else None


@dataclass
class ErrorRecord:
    """A bad sample: recorded in errors.jsonl, counted in the summary, never silently dropped.

    `reason` is a short category ('empty caption', 'missing file', ...) so summaries can count it;
    `detail` names the file / line and what went wrong."""
    id: str
    stage: str
    reason: str
    source: str = ""
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class ManifestError(ValueError):
    """A manifest line that does not match the schema (the message names file and line)."""


def _dumps(d: dict) -> str:
    return json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def validate_record(d: Any) -> Record:
    """Check one parsed manifest object; raise ManifestError naming the problem."""
    if not isinstance(d, dict):
        raise ManifestError(f"expected a JSON object, got {type(d).__name__}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ManifestError(f"missing field(s) {', '.join(missing)}")
    for k in ("id", "source", "group"):
        if not isinstance(d[k], str) or not d[k]:
            raise ManifestError(f"field '{k}' must be a non-empty string, got {d[k]!r}")
    if d["task"] not in TASKS:
        raise ManifestError(f"unknown task {d['task']!r} (valid: {', '.join(TASKS)})")
    if d.get("split") is not None and d["split"] not in SPLITS:
        raise ManifestError(f"unknown split {d['split']!r} (valid: {', '.join(SPLITS)})")
    mods, text = d["modalities"], d["text"]
    if not isinstance(mods, dict) or any(k not in MODALITIES for k in mods):
        raise ManifestError(f"'modalities' must map {MODALITIES} to {{'path': ...}}, got {mods!r}")
    for k, v in mods.items():
        if not isinstance(v, dict) or not isinstance(v.get("path"), str) or not v["path"]:
            raise ManifestError(f"modality '{k}' needs a non-empty 'path', got {v!r}")
    if not isinstance(text, dict) or not all(isinstance(text.get(k, ""), str) for k in ("prompt", "caption")):
        raise ManifestError(f"'text' must be {{'prompt': str, 'caption': str}}, got {text!r}")
    if "meta" in d and not isinstance(d["meta"], dict):
        raise ManifestError(f"'meta' must be an object, got {d['meta']!r}")
    return Record.from_dict(d)


def _resolve_paths(rec: Record, root: Optional[Path]) -> Record:
    for v in rec.modalities.values():
        p = Path(v["path"])
        if p.is_absolute() or is_uri(v["path"]):
            continue
        if root is None:
            raise ManifestError(f"record {rec.id}: relative media path {v['path']!r} in a manifest on an object "
                                f"store; write absolute (local or shared-FS) paths or pass root=")
        v["path"] = str((root / p).resolve())
    return rec


def parse_line(line: str, n: int, path: Any, base: Optional[Path],
               strict: bool = False) -> tuple[Optional[Record], Optional[ErrorRecord]]:
    """One manifest line -> (record, None), (None, error) or (None, None) for a blank line.
    The one parser of manifest lines: read_manifest and the streaming shard plan both use it."""
    if not line.strip():
        return None, None
    obj: Any = None
    try:
        obj = json.loads(line)
        rec = validate_record(obj)
    except (json.JSONDecodeError, ManifestError) as e:
        kind = "bad JSON" if isinstance(e, json.JSONDecodeError) else "invalid record"
        msg = f"{path}: line {n}: {kind}: {e}"
        if strict:
            raise ManifestError(msg) from e
        rid = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
        src = obj.get("source", "") if isinstance(obj, dict) else ""
        return None, ErrorRecord(id=rid or f"{locate(path).name}:line{n}", stage="read",
                                 reason=f"malformed manifest line ({kind})",
                                 source=src if isinstance(src, str) else "", detail=msg)
    try:
        return _resolve_paths(rec, base), None
    except ManifestError as e:
        if strict:
            raise ManifestError(f"{path}: line {n}: {e}") from e
        return None, ErrorRecord(id=rec.id, stage="read", reason="relative media path",
                                 source=rec.source, detail=f"{path}: line {n}: {e}")


def manifest_base(path: PathLike, root: str | Path | None = None) -> Optional[Path]:
    """Where relative media paths resolve: `root`, else a local manifest's directory, else nowhere."""
    loc = locate(path)
    return Path(root) if root is not None else (loc.parent.local if loc.is_local else None)


MANIFEST_TODO = "give the manifest.jsonl that `lumo data normalize` wrote"
_HEAD_LINES = 20  # lines check_manifest reads: none of them a record -> not a manifest
_MAX_LINE = 1 << 24  # characters of a line it reads (a binary file may hold no newline at all)


def require_manifest(path) -> None:
    """A missing manifest is a user error, raised before anything is written (tokenize, read)."""
    if not locate(path).exists():
        from ..errors import UserError
        raise UserError("manifest", path, "not found", MANIFEST_TODO)


def check_manifest(path, what: str = "manifest", todo: str = MANIFEST_TODO) -> None:
    """What a command that starts a job on a manifest checks first (a UserError, before Ray and before
    anything is written): it exists, is a file, holds a sample, and its first lines hold records (a
    README, an image or a raw dataset's metadata is no manifest). Reads only the head of the file."""
    from ..errors import UserError

    loc = locate(path)
    if not loc.exists():
        raise UserError(what, path, "not found", todo)
    if loc.is_dir():
        inside = loc / "manifest.jsonl"
        raise UserError(what, path, "is a directory", f"did you mean {inside}?" if inside.exists() else todo)
    first, lines = None, 0
    with loc.open_read() as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=None) as fh:
        for n, line in enumerate(iter(lambda: fh.readline(_MAX_LINE), ""), start=1):
            if not line.strip():
                continue
            rec, err = parse_line(line, n, path, None)
            if rec is not None or (err is not None and err.reason == "relative media path"):
                return  # a record (its paths are the job's to resolve)
            first = first or (line, err)
            lines += 1
            if lines >= _HEAD_LINES:
                break
    if first is None:
        raise UserError(what, path, "is empty: no samples", "normalize a dataset that has samples "
                        "(`lumo data normalize`) and give its manifest.jsonl")
    line, err = first
    if line.lstrip()[:1] in ("[", "{") and not loc.name.endswith(".jsonl"):
        why = "a JSON document (a raw dataset's metadata?), not a manifest (one record per line)"
        todo = "turn it into a manifest first: lumo data normalize --source SOURCE --input it --out DIR"
    else:
        why = (f"not a manifest: none of its first {lines} lines is a record" if lines > 1 else "not a manifest") \
            + (f" ({err.detail[len(str(path)) + 2:]})" if err else "")
    raise UserError(what, path, why, todo)


def read_manifest(path: PathLike, root: str | Path | None = None,
                  strict: bool = False) -> tuple[list[Record], list[ErrorRecord]]:
    """Read and validate a manifest JSONL file (a local path or an object-store URI).

    A malformed line (bad JSON, missing field, unknown task ...) becomes an ErrorRecord with
    stage='read' whose detail names the file and line number; `strict=True` raises instead.
    Relative media paths resolve against `root` (default: the manifest's directory when it is local;
    a manifest on an object store must hold absolute media paths)."""
    path = locate(path)
    base = manifest_base(path, root)
    records: list[Record] = []
    errors: list[ErrorRecord] = []
    require_manifest(path)
    # StringIO(newline=None) splits lines exactly as a text-mode file would (not str.splitlines,
    # which also breaks at U+2028 and friends that ensure_ascii=False leaves in captions).
    with io.StringIO(path.read_text(), newline=None) as fh:
        for n, line in enumerate(fh, start=1):
            rec, err = parse_line(line, n, path, base, strict)
            if rec is not None:
                records.append(rec)
            elif err is not None:
                errors.append(err)
    return records, errors


def write_jsonl(rows: Iterable[dict], path: PathLike, key: str = "id") -> Union[Path, str]:
    """Write dicts as JSONL sorted by `key` (then by full content), deterministic bytes; atomic
    (temp + rename, or temp + move on an object store). Returns a Path when local, else the URI."""
    loc = locate(path)
    lines = sorted((r[key], _dumps(r)) for r in rows)
    loc.write_atomic("".join(s + "\n" for _, s in lines).encode("utf-8"))
    return where(loc)


def write_manifest(records: Iterable[Record], path: PathLike) -> Union[Path, str]:
    """Write records sorted by id; refuses duplicate ids (they would make ids ambiguous)."""
    rows = [r.to_dict() for r in records]
    seen: set[str] = set()
    for r in rows:
        if r["id"] in seen:
            raise ManifestError(f"{path}: duplicate id {r['id']!r}")
        seen.add(r["id"])
    return write_jsonl(rows, path)


def write_errors(errors: Iterable[ErrorRecord], path: PathLike) -> Union[Path, str]:
    return write_jsonl([e.to_dict() for e in errors], path)


def dropped_warning(reasons: list[str], total: int, errors_path: Any) -> Optional[str]:
    """The line a job prints whenever it dropped records (under the error-rate ceiling it still exits 0):
    the count, the rate, the top reasons and where each dropped record is described; None if none."""
    if not reasons:
        return None
    from collections import Counter

    top = ", ".join(f"{r} ({c})" for r, c in Counter(reasons).most_common(3))
    return (f"WARNING: dropped {len(reasons)} of {total} records ({len(reasons) / max(total, 1):.1%}): "
            f"{top}; each one is in {errors_path}")


def read_errors(path: PathLike) -> list[ErrorRecord]:
    return [ErrorRecord(**json.loads(line)) for line in locate(path).read_text().splitlines() if line.strip()]
