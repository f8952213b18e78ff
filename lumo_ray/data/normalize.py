"""Normalization (docs/stage2_data.md), the Ray-free half: read, probe a batch, split, summarize, write.

The Ray Data job (`pipelines/normalize.py:run_normalize`) only distributes `probe_batch` over
record batches; everything else runs here, on the driver, so the outputs are a pure function of
the input files and the config:

    <out_dir>/manifest.jsonl   good records, sorted by id, with split and meta.probe
    <out_dir>/errors.jsonl     bad samples {id, stage, reason, source, detail}, sorted by id, and exact
                               duplicates (stage 'dedupe', reason 'duplicate media', 'duplicate of <id>')
                               (stage 'bounds': an id, caption or prompt over its configured maximum,
                               an id that is not printable, text that is not valid UTF-8)
    <out_dir>/summary.json     counts per source / split / task / stage / reason, error_rate, leakage
    <out_dir>/config.yaml      the resolved NormalizeConfig (as {"data": {"normalize": ...}})

`normalize_local` runs the same steps with a plain loop instead of Ray (notebooks, debugging).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..config import NormalizeConfig, dump_config
from ..storage import locate
from .manifest import ErrorRecord, Record, dropped_warning, write_errors, write_manifest
from .probe import probe_record
from .readers import read_source
from .splits import apply_splits, check_leakage


class NormalizeError(RuntimeError):
    """The job finished writing its files but its error rate is above the configured ceiling."""


def log(msg: str) -> None:
    print(f"[normalize] {msg}", flush=True)


def read_and_dedupe(source: str, input_path: str | Path) -> tuple[list[Record], list[ErrorRecord]]:
    """Run the source reader; a repeated id is an error (the first occurrence is kept)."""
    records, errors = read_source(source, input_path)
    seen: set[str] = set()
    kept: list[Record] = []
    for r in records:
        if r.id in seen:
            errors.append(ErrorRecord(id=r.id, stage="read", reason="duplicate id", source=r.source,
                                      detail=f"{input_path}: id {r.id!r} appears more than once"))
            continue
        seen.add(r.id)
        kept.append(r)
    return kept, errors


def shown(s: str, limit: int = 120) -> str:
    """A string as one printable line of at most ~`limit` characters: control characters, NUL and
    unencodable surrogates escaped (\\x00, \\udcff), the rest cut with its length named. Error ids and
    details go through it, so a hostile id cannot break errors.jsonl or a log line."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in s[:limit])
    return out + (f"... ({len(s)} characters)" if len(s) > limit else "")


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def bounds_error(r: Record, cfg: NormalizeConfig) -> Optional[ErrorRecord]:
    """Why one record breaks the configured bounds (stage 'bounds'), or None: the id (length, printable),
    caption and prompt (length), and every text field valid UTF-8 (a reader decodes bad bytes as lone
    surrogates so the record, not the file, is refused)."""
    def err(reason: str, why: str) -> ErrorRecord:
        return ErrorRecord(id=shown(r.id, cfg.max_id_chars), stage="bounds", reason=reason,
                           source=shown(r.source), detail=f"{shown(r.id)}: {why}")

    if len(r.id) > cfg.max_id_chars:
        return err("id too long", f"id has {len(r.id)} characters > data.normalize.max_id_chars {cfg.max_id_chars}")
    if not r.id.isprintable():
        bad = next(c for c in r.id if not c.isprintable())
        return err("id not printable", f"id holds {shown(bad)} (ids must be printable: no NUL, newline or "
                                       "control character)")
    for field, limit, key in (("caption", cfg.max_caption_chars, "max_caption_chars"),
                              ("prompt", cfg.max_prompt_chars, "max_prompt_chars")):
        text = r.text.get(field) or ""
        if len(text) > limit:
            return err(f"{field} too long", f"text.{field} has {len(text)} characters > data.normalize.{key} {limit}")
    fields = {"group": r.group, "source": r.source, **{f"text.{k}": v for k, v in r.text.items() if isinstance(v, str)},
              **{f"modalities.{m}.path": r.media_path(m) or "" for m in r.modalities}}
    for field, value in fields.items():
        if not _utf8(value):
            return err("bad encoding", f"{field} is not valid UTF-8 (undecodable bytes or a lone surrogate)")
    try:
        json.dumps(r.to_dict(), ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError) as e:
        return err("bad encoding", f"the record cannot be written as UTF-8 JSON ({type(e).__name__})")
    return None


def apply_bounds(records: list[Record], cfg: NormalizeConfig) -> tuple[list[Record], list[ErrorRecord]]:
    """Records within the bounds, and an error row for each other one (the job goes on)."""
    kept, errors = [], []
    for r in records:
        e = bounds_error(r, cfg)
        (kept.append(r) if e is None else errors.append(e))
    return kept, errors


def safe_error(e: ErrorRecord, cfg: NormalizeConfig) -> ErrorRecord:
    """An error row that can always be written: id bounded and printable, detail one printable line."""
    if len(e.id) <= cfg.max_id_chars and e.id.isprintable() and _utf8(e.detail) and _utf8(e.source) \
            and e.detail.isprintable() and len(e.detail) <= 4096:
        return e
    return ErrorRecord(id=shown(e.id, cfg.max_id_chars), stage=e.stage, reason=shown(e.reason),
                       source=shown(e.source), detail=shown(e.detail, 4096))


def drop_duplicates(records: list[Record]) -> tuple[list[Record], list[ErrorRecord]]:
    """Exact duplicates by media content (probe's sha256), the first in id order kept. A record whose
    task and media equal an earlier record's is `duplicate of <id>` when it is in another group (the same bytes
    under unrelated keys, which would also carry one item into both splits) or when its caption is the
    same too (the same sample twice). Other captions of the same item (same group: Clotho's five per
    clip, AudioCaps' per YouTube clip) are not duplicates. Text-only records are kept."""
    first: dict[tuple, Record] = {}
    kept, dups = [], []
    for r in sorted(records, key=lambda r: r.id):
        probes = r.meta.get("probe") or {}
        media = tuple(sorted((m, p.get("sha256")) for m, p in probes.items()))
        if not media or any(h is None for _, h in media):
            kept.append(r)
            continue
        f = first.setdefault((r.task, media), r)  # a2t and t2a of one clip are two samples
        same_caption = f.text.get("caption") == r.text.get("caption")
        if f is r or (f.group == r.group and not same_caption):
            kept.append(r)
            continue
        files = ", ".join(f"{m} {r.media_path(m)}" for m, _ in media)
        why = "same media content and caption" if f.group == r.group else f"same media content, group {f.group!r}"
        dups.append(ErrorRecord(id=r.id, stage="dedupe", reason="duplicate media", source=r.source,
                                detail=f"{r.id}: duplicate of {f.id} ({why}): {files}"))
    return kept, dups


def to_rows(records: Iterable[Record]) -> list[dict]:
    """Records as flat rows for Ray Data: nested dicts travel as one JSON string column."""
    return [{"id": r.id, "json": json.dumps(r.to_dict(), sort_keys=True)} for r in records]


def probe_batch(batch: dict, min_audio_seconds: float = 0.05) -> dict:
    """Probe a batch of rows {"id": [...], "json": [...]} -> {"id", "ok", "json"} (record or error)."""
    ids, oks, out = [], [], []
    for text in batch["json"]:
        res = probe_record(Record.from_dict(json.loads(str(text))), min_audio_seconds)
        ids.append(res.id)
        oks.append(isinstance(res, Record))
        out.append(json.dumps(res.to_dict(), sort_keys=True))
    return {"id": ids, "ok": oks, "json": out}


def from_rows(rows: Iterable[dict]) -> tuple[list[Record], list[ErrorRecord]]:
    """Probe output rows back into records and errors, sorted by id (order-independent)."""
    records, errors = [], []
    for row in rows:
        d = json.loads(str(row["json"]))
        if bool(row["ok"]):
            records.append(Record.from_dict(d))
        else:
            errors.append(ErrorRecord(**d))
    return sorted(records, key=lambda r: r.id), sorted(errors, key=lambda e: (e.id, e.stage))


def summarize(source: str, input_path: str | Path, records: list[Record], errors: list[ErrorRecord],
              cfg: NormalizeConfig) -> dict:
    total = len(records) + len(errors)
    n_dup = sum(e.stage == "dedupe" for e in errors)  # recorded, but not bad input: the ceiling ignores them
    per_source: dict[str, dict] = {}
    for r in records:
        per_source.setdefault(r.source, {"ok": 0, "errors": 0})["ok"] += 1
    for e in errors:
        per_source.setdefault(e.source or source, {"ok": 0, "errors": 0})["errors"] += 1
    per_split = {s: {"samples": sum(r.split == s for r in records),
                     "groups": len({r.group for r in records if r.split == s})} for s in ("train", "eval")}
    return {
        "source": source, "input": str(locate(input_path)),
        "total": total, "ok": len(records), "errors": len(errors), "duplicates": n_dup,
        "error_rate": round((len(errors) - n_dup) / total, 6) if total else 0.0,
        "error_rate_ceiling": cfg.error_rate_ceiling,
        "per_source": dict(sorted(per_source.items())),
        "per_split": per_split,
        "per_task": dict(sorted(Counter(r.task for r in records).items())),
        "per_stage": dict(sorted(Counter(e.stage for e in errors).items())),
        "per_reason": dict(sorted(Counter(e.reason for e in errors).items(), key=lambda kv: (-kv[1], kv[0]))),
        "leakage": check_leakage(records),
        "files": {"manifest": "manifest.jsonl", "errors": "errors.jsonl", "config": "config.yaml"},
    }


def finalize(source: str, input_path: str | Path, out_dir: str | Path, cfg: NormalizeConfig,
             records: list[Record], errors: list[ErrorRecord]) -> dict:
    """Assign splits, write manifest / errors / summary / config (into a directory or an object-store
    URI: the manifest's media paths are absolute, so it reads the same from anywhere), then apply the
    error-rate gate."""
    out = locate(out_dir)
    if out.is_local:
        out.local.mkdir(parents=True, exist_ok=True)
    errors = [safe_error(e, cfg) for e in errors]
    apply_splits(records, cfg.eval_permille, cfg.min_eval)
    summary = summarize(source, input_path, records, errors, cfg)
    write_manifest(records, out / "manifest.jsonl")
    write_errors(errors, out / "errors.jsonl")
    dump_config({"data": {"normalize": asdict(cfg)}}, out, "config.yaml")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"wrote {out}/manifest.jsonl: {summary['ok']} samples "
        f"(train {summary['per_split']['train']['samples']}, eval {summary['per_split']['eval']['samples']}), "
        f"{summary['errors']} errors, error rate {summary['error_rate']:.3f}")
    warn = dropped_warning([e.reason for e in errors], summary["total"], out / "errors.jsonl")
    if warn:
        log(warn)
    if not summary["leakage"]["ok"]:  # cannot happen with group splits; guard the invariant anyway
        raise NormalizeError(f"{out}: split leakage {summary['leakage']}")
    if summary["total"] == 0:
        raise NormalizeError(f"{source} ({input_path}): no samples read; wrong --input or --source?")
    if summary["error_rate"] > cfg.error_rate_ceiling:
        top = ", ".join(f"{k}: {v}" for k, v in list(summary["per_reason"].items())[:5])
        raise NormalizeError(
            f"{source} ({input_path}): error rate {summary['error_rate']:.3f} > ceiling "
            f"{cfg.error_rate_ceiling} ({summary['errors']} of {summary['total']} samples bad); "
            f"top reasons: {top}; see {out / 'errors.jsonl'}")
    return summary


def normalize_with(probe_rows: Callable[[list[dict]], Iterable[dict]], source: str,
                   input_path: str | Path, out_dir: str | Path, cfg: NormalizeConfig,
                   read: Optional[tuple[list[Record], list[ErrorRecord]]] = None) -> dict:
    """The whole job with a pluggable probe executor (Ray Data in pipelines/, a loop here). read: the
    result of read_and_dedupe when the caller read the metadata already (before starting Ray, so a
    bad input fails in a second)."""
    records, read_errors = read or read_and_dedupe(source, input_path)
    records, bound_errors = apply_bounds(records, cfg)
    read_errors = read_errors + bound_errors
    log(f"read {source} from {input_path}: {len(records)} records, {len(read_errors)} read errors")
    good, probe_errors = from_rows(probe_rows(to_rows(records)))
    good, dups = drop_duplicates(good) if cfg.dedupe else (good, [])
    log(f"probed {len(records)} records: {len(good)} ok, {len(probe_errors)} bad media, {len(dups)} duplicates")
    return finalize(source, input_path, out_dir, cfg, good, read_errors + probe_errors + dups)


def normalize_local(source: str, input_path: str | Path, out_dir: str | Path,
                    cfg: NormalizeConfig | None = None) -> dict:
    """Same outputs as the Ray job, probing in-process in batches of cfg.probe_batch_size."""
    cfg = cfg or NormalizeConfig()

    def run(rows: list[dict]) -> Iterable[dict]:
        for i in range(0, len(rows), cfg.probe_batch_size):
            chunk = rows[i:i + cfg.probe_batch_size]
            res = probe_batch({"id": [r["id"] for r in chunk], "json": [r["json"] for r in chunk]},
                              cfg.min_audio_seconds)
            yield from (dict(zip(res, vals)) for vals in zip(*res.values()))

    return normalize_with(run, source, input_path, out_dir, cfg)
