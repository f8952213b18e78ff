"""Generation over a manifest (library, no Ray): `lumo generate --manifest M --task T` plans the records
into fixed units, generates each record alone with its own seed, and writes a unit's rows and media as
soon as it is done; results.jsonl is the units in manifest order.

Bytes do not depend on how many actors run: a record is generated in a batch of one, with the seed
`opts.seed + its index in the manifest`, at a fixed thread count; a unit's files are named by record
index. A re-run keeps every finished unit (its parts file exists) and generates the rest.
"""
from __future__ import annotations

import base64
import json
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .data.manifest import Record
from .generate import TARGET, GenOptions, Run

MEDIA_OF = {"t2i": "image", "i2t": "image", "t2a": "audio", "a2t": "audio"}


def applicable(records: list[Record], task: str) -> tuple[list[tuple[int, Record]], dict]:
    """(index, record) of the records the task can take (t2x: a caption; x2t: a media file of its
    modality), and {reason: count} of the others, which are reported, not failed."""
    keep, skipped = [], {}
    mod = MEDIA_OF[task]
    for i, r in enumerate(records):
        if task in ("t2i", "t2a") and not (r.text.get("caption") or "").strip():
            why = "no caption"
        elif r.media_path(mod) is None:
            why = f"no {mod}"
        else:
            keep.append((i, r))
            continue
        skipped[why] = skipped.get(why, 0) + 1
    return keep, skipped


def plan_units(items: list[tuple[int, Record]], unit_size: int) -> list[list[tuple[int, Record]]]:
    return [items[k: k + unit_size] for k in range(0, len(items), unit_size)]


def unit_name(k: int) -> str:
    return f"unit-{k:06d}.jsonl"


def safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:80]


def generate_record(run: Run, task: str, index: int, rec: Record, opts: GenOptions, n: int) -> tuple[dict, dict]:
    """One record -> (its row, {file name: bytes}); a record that cannot be generated (unreadable
    media) is a row with an `error` naming the stage and reason."""
    from .generate import generate

    o = replace(opts, seed=opts.seed + index)
    row: dict[str, Any] = {"index": index, "id": rec.id, "task": task, "seed": o.seed}
    prompt = rec.text.get("caption") if task in ("t2i", "t2a") else None
    src = rec.media_path(MEDIA_OF[task]) if prompt is None else None
    row["prompt" if prompt is not None else "input"] = prompt if prompt is not None else src
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="lumo-gen-") as tmp:
        try:
            out = generate(run, task, tmp, prompt=prompt, input_path=src, n=n, opts=o, log=lambda *a, **k: None)
        except Exception as e:  # a bad record is data: its row says why, the others go on
            row["error"] = {"stage": "generate", "reason": type(e).__name__, "detail": str(e)[:500]}
            return row, files
        samples = []
        for r in out:
            s = {"ids": r["ids"], "ok": r["ok"]}
            if TARGET[task] == "text":
                s["text"] = r.get("text")
            elif r.get("file"):
                name = f"media/{index:06d}-{safe(rec.id)}-{r['index']}{Path(r['file']).suffix}"
                files[name] = Path(r["file"]).read_bytes()
                s["file"] = name
            samples.append(s)
    row["samples"] = samples
    return row, files


def generate_unit(run: Run, task: str, unit: list[dict], opts: dict, n: int) -> dict:
    """A planned unit (records as dicts with their index) -> {'rows': json lines, 'files': {name: base64}}."""
    o = GenOptions(**opts)
    rows, files = [], {}
    for item in unit:
        row, f = generate_record(run, task, item["index"], Record.from_dict(item["record"]), o, n)
        rows.append(json.dumps(row, sort_keys=True))
        files.update({k: base64.b64encode(v).decode() for k, v in f.items()})
    return {"rows": "\n".join(rows) + "\n", "files": files}


def unit_payload(unit: list[tuple[int, Record]]) -> str:
    return json.dumps([{"index": i, "record": r.to_dict()} for i, r in unit])
