"""Readers for the raw dataset formats (docs/stage2_data.md). Each yields `Record`s and `ErrorRecord`s.

Ids are `<source>:<key>` with the key taken from the source's own fields (never a list position),
so they stay unique when manifests of several sources are concatenated:

| source         | id key                  | group                                  | task |
|----------------|-------------------------|----------------------------------------|------|
| llava_pretrain | entry `id`              | the image file                         | i2t  |
| audiocaps      | `audiocap_id`           | `youtube_id` (its 5 captions share a clip), else the audio file | a2t |
| clotho         | `<file_name>#<k>`, k=1..5 | the clip `file_name`                 | a2t  |
| wavcaps        | entry `id`              | the clip id                            | a2t  |
| jsonl          | the record's own `id`   | the record's own `group`               | any  |

For `jsonl` a folder input means its `manifest.jsonl` when present (a normalize output folder),
else every `*.jsonl` except `errors.jsonl`.

`input_path` is the dataset folder or its metadata file, a local path or an object-store URI; media
paths are made absolute (on an object store: URIs below the metadata file's folder).
Audio sources have no prompt in their raw format: `text.prompt` is "" (the sequence builder adds
the instruction). Empty captions are errors (reason 'empty caption'), recorded, not dropped.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from ..errors import UserError
from ..storage import Loc, is_uri, locate
from .manifest import ErrorRecord, Record, read_manifest

Item = Union[Record, ErrorRecord]
SOURCES = ("llava_pretrain", "audiocaps", "clotho", "wavcaps", "jsonl")


class ReaderError(UserError):
    """The input as a whole cannot be read (no metadata file, wrong top-level shape)."""


def _text(meta_file: Loc) -> str:
    """The metadata file as text; bytes that are not UTF-8 become lone surrogates, so the one record
    holding them is refused by normalize ('bad encoding'), not the whole file."""
    return meta_file.read_bytes().decode("utf-8", errors="surrogateescape")


def _load_json(meta_file: Loc, source: str) -> Any:
    try:
        return json.loads(_text(meta_file))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ReaderError(f"{source} metadata", meta_file, f"not valid JSON ({e})",
                          "give the dataset's metadata file or its folder") from None


def _metadata_files(input_path: Loc, suffix: str, source: str) -> list[Loc]:
    """The metadata file itself, or every `*suffix` file directly in the folder (sorted)."""
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise ReaderError(f"{source} input", input_path, "not found", "give the dataset folder or its metadata file")
    files = [input_path / n for n in input_path.children() if n.endswith(suffix)]
    if not files:
        raise ReaderError(f"{source} input", input_path, f"no *{suffix} metadata file in the folder",
                          f"give the folder that holds the *{suffix} file, or the file itself")
    return files


def _err(source: str, key: str, reason: str, detail: str) -> ErrorRecord:
    return ErrorRecord(id=f"{source}:{key}", stage="read", reason=reason, source=source, detail=detail)


def _abs(root: Loc, rel: str) -> str:
    """A media path from the metadata: absolute paths and URIs as they are, else below `root`."""
    if is_uri(rel) or Path(rel).is_absolute():
        return rel
    if not root.is_local:
        return str(root / rel)
    try:
        return str((root.local / rel).resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: probe records this one record
        return os.path.abspath(root.local / rel)


def read_llava_pretrain(input_path: Loc) -> Iterator[Item]:
    """LLaVA-Pretrain JSON list: {id, image, conversations: [{from: human}, {from: gpt}]}."""
    src = "llava_pretrain"
    for meta_file in _metadata_files(input_path, ".json", src):
        data = _load_json(meta_file, src)
        if not isinstance(data, list):
            raise ReaderError(f"{src} metadata", meta_file, f"expected a JSON list of samples, got a {type(data).__name__}",
                              "give LLaVA-Pretrain's blip_laion_cc_sbu_558k.json (a list)")
        root = meta_file.parent
        for n, e in enumerate(data):
            key = str(e.get("id", "")) if isinstance(e, dict) else ""
            where = f"{meta_file}: entry {n} (id {key or '?'})"
            if not key:
                yield _err(src, f"{meta_file.name}#entry{n}", "malformed entry", f"{where}: missing 'id'")
                continue
            conv = [c for c in (e.get("conversations") or []) if isinstance(c, dict)]
            human = next((str(c.get("value", "")) for c in conv if c.get("from") == "human"), None)
            gpt = next((str(c.get("value", "")) for c in conv if c.get("from") == "gpt"), None)
            if not e.get("image") or human is None or gpt is None:
                yield _err(src, key, "malformed entry", f"{where}: needs 'image' and human + gpt turns")
                continue
            if not gpt.strip():
                yield _err(src, key, "empty caption", f"{where}: gpt turn is empty")
                continue
            yield Record(id=f"{src}:{key}", source=src, group=f"{src}:{e['image']}", task="i2t",
                         modalities={"image": {"path": _abs(root, e["image"])}},
                         text={"prompt": human, "caption": gpt.strip()},
                         meta={"source_id": key})


def _csv_rows(meta_file: Loc, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    with io.StringIO(_text(meta_file), newline="") as fh:  # as open(newline=""): csv splits the rows
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ReaderError("metadata", meta_file, f"missing column(s) {', '.join(missing)} (has {reader.fieldnames})",
                              "check --source matches the file")
        for n, row in enumerate(reader, start=2):  # line 1 is the header
            yield n, row


def read_audiocaps(input_path: Loc) -> Iterator[Item]:
    """AudioCaps CSV: audiocap_id, youtube_id, start_time, caption; audio at audio/<audiocap_id>.wav."""
    src = "audiocaps"
    for meta_file in _metadata_files(input_path, ".csv", src):
        root = meta_file.parent
        for n, row in _csv_rows(meta_file, ("audiocap_id", "caption")):
            key = (row.get("audiocap_id") or "").strip()
            if not key:
                yield _err(src, f"{meta_file.name}#line{n}", "malformed entry", f"{meta_file}: line {n}: empty audiocap_id")
                continue
            caption = (row.get("caption") or "").strip()
            if not caption:
                yield _err(src, key, "empty caption", f"{meta_file}: line {n}: audiocap_id {key}")
                continue
            yt = (row.get("youtube_id") or "").strip()
            yield Record(id=f"{src}:{key}", source=src, group=f"{src}:yt:{yt}" if yt else f"{src}:{key}",
                         task="a2t", modalities={"audio": {"path": _abs(root, f"audio/{key}.wav")}},
                         text={"prompt": "", "caption": caption},
                         meta={"source_id": key, "youtube_id": yt, "start_time": (row.get("start_time") or "").strip()})


def read_clotho(input_path: Loc) -> Iterator[Item]:
    """Clotho CSV: file_name, caption_1..caption_5 -> one sample per caption, grouped by clip."""
    src = "clotho"
    for meta_file in _metadata_files(input_path, ".csv", src):
        root = meta_file.parent
        audio_dir = root / "audio" if (root / "audio").is_dir() else root
        for n, row in _csv_rows(meta_file, ("file_name",)):
            name = row.get("file_name") or ""
            if not name.strip():
                yield _err(src, f"{meta_file.name}#line{n}", "malformed entry", f"{meta_file}: line {n}: empty file_name")
                continue
            for k in range(1, 6):
                caption = (row.get(f"caption_{k}") or "").strip()
                key = f"{name}#{k}"
                if not caption:
                    yield _err(src, key, "empty caption", f"{meta_file}: line {n}: caption_{k} of {name!r} is empty")
                    continue
                yield Record(id=f"{src}:{key}", source=src, group=f"{src}:{name}", task="a2t",
                             modalities={"audio": {"path": _abs(audio_dir, name)}},
                             text={"prompt": "", "caption": caption},
                             meta={"source_id": name, "caption_index": k})


def read_wavcaps(input_path: Loc) -> Iterator[Item]:
    """WavCaps JSON {"data": [{id, caption, duration, audio?}]}; audio from 'audio' or audio/<id>."""
    src = "wavcaps"
    for meta_file in _metadata_files(input_path, ".json", src):
        doc = _load_json(meta_file, src)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise ReaderError(f"{src} metadata", meta_file, 'expected {"data": [...]}', "check --source matches the file")
        root = meta_file.parent
        for n, e in enumerate(doc["data"]):
            key = str(e.get("id", "")) if isinstance(e, dict) else ""
            if not key:
                yield _err(src, f"{meta_file.name}#entry{n}", "malformed entry", f"{meta_file}: entry {n}: missing 'id'")
                continue
            caption = str(e.get("caption") or "").strip()
            if not caption:
                yield _err(src, key, "empty caption", f"{meta_file}: entry {n} (id {key})")
                continue
            audio = e.get("audio") or f"audio/{key}"
            meta = {"source_id": key}
            if e.get("duration") is not None:
                meta["declared_duration"] = e["duration"]
            yield Record(id=f"{src}:{key}", source=src, group=f"{src}:{key}", task="a2t",
                         modalities={"audio": {"path": _abs(root, audio)}},
                         text={"prompt": "", "caption": caption}, meta=meta)


def read_jsonl(input_path: Loc) -> Iterator[Item]:
    """Manifest-shaped JSONL; malformed lines become errors naming the line number."""
    files = _metadata_files(input_path, ".jsonl", "jsonl")
    if input_path.is_dir():  # a normalize output folder: its manifest, never its errors.jsonl
        named = [f for f in files if f.name == "manifest.jsonl"]
        files = named or [f for f in files if f.name != "errors.jsonl"]
    for f in files:
        records, errors = read_manifest(f)
        for e in errors:
            e.source = e.source or "jsonl"
        for r in records:
            if not (r.text.get("caption") or "").strip():
                yield ErrorRecord(id=r.id, stage="read", reason="empty caption", source=r.source,
                                  detail=f"{f}: record {r.id} has an empty caption")
            else:
                yield r
        yield from errors


READERS: dict[str, Callable[[Loc], Iterator[Item]]] = {
    "llava_pretrain": read_llava_pretrain,
    "audiocaps": read_audiocaps,
    "clotho": read_clotho,
    "wavcaps": read_wavcaps,
    "jsonl": read_jsonl,
}


def read_source(source: str, input_path: str | Path) -> tuple[list[Record], list[ErrorRecord]]:
    """Run the reader of `source` on a folder or metadata file; returns (records, errors)."""
    if source not in READERS:
        raise ReaderError("source", source, "unknown", f"use one of {', '.join(SOURCES)}")
    records: list[Record] = []
    errors: list[ErrorRecord] = []
    for item in READERS[source](locate(input_path)):
        (records if isinstance(item, Record) else errors).append(item)
    return records, errors
