"""Manifest schema (SPEC §5): one JSON object per line, one sample per line.

Fields: `id` (stable, from the source's own keys), `source`, `group` (never straddles train/eval),
`task` ('a2t', 'i2t', 't2a', 't2i', 't'), `modalities` ({"image": {"path": ...}} and/or
{"audio": {"path": ...}}), `text` ({"prompt", "caption"}), `split` ('train' / 'eval', or None
before splitting), `meta` (source keys, probe results).

Paths: readers and `normalize` store **absolute** media paths, so a manifest stays usable when it is
written to (or copied into) another directory. A hand-written manifest may hold relative paths:
`read_manifest` resolves them against `root` (default: the manifest file's own directory).

Files are written sorted by id with sorted keys and fixed separators: same records -> same bytes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

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


def _resolve_paths(rec: Record, root: Path) -> Record:
    for v in rec.modalities.values():
        p = Path(v["path"])
        v["path"] = str(p if p.is_absolute() else (root / p).resolve())
    return rec


def read_manifest(path: str | Path, root: str | Path | None = None,
                  strict: bool = False) -> tuple[list[Record], list[ErrorRecord]]:
    """Read and validate a manifest JSONL file.

    A malformed line (bad JSON, missing field, unknown task ...) becomes an ErrorRecord with
    stage='read' whose detail names the file and line number; `strict=True` raises instead.
    Relative media paths resolve against `root` (default: the manifest's directory)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    records: list[Record] = []
    errors: list[ErrorRecord] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
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
                errors.append(ErrorRecord(id=rid or f"{path.name}:line{n}", stage="read",
                                          reason=f"malformed manifest line ({kind})",
                                          source=src if isinstance(src, str) else "", detail=msg))
                continue
            records.append(_resolve_paths(rec, base))
    return records, errors


def write_jsonl(rows: Iterable[dict], path: str | Path, key: str = "id") -> Path:
    """Write dicts as JSONL sorted by `key` (then by full content), deterministic bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = sorted((r[key], _dumps(r)) for r in rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(s + "\n" for _, s in lines), encoding="utf-8")
    tmp.replace(path)
    return path


def write_manifest(records: Iterable[Record], path: str | Path) -> Path:
    """Write records sorted by id; refuses duplicate ids (they would make ids ambiguous)."""
    rows = [r.to_dict() for r in records]
    seen: set[str] = set()
    for r in rows:
        if r["id"] in seen:
            raise ManifestError(f"{path}: duplicate id {r['id']!r}")
        seen.add(r["id"])
    return write_jsonl(rows, path)


def write_errors(errors: Iterable[ErrorRecord], path: str | Path) -> Path:
    return write_jsonl([e.to_dict() for e in errors], path)


def read_errors(path: str | Path) -> list[ErrorRecord]:
    with open(path, encoding="utf-8") as fh:
        return [ErrorRecord(**json.loads(line)) for line in fh if line.strip()]
