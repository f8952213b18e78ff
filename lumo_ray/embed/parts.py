"""An embeddings folder (library, no Ray): `<out>/<split>/part-NNNNNN.parquet` (columns id, split, image,
text: one row per record, L2-normalised float32 vectors, rows in id order), each with a
`.stats.json`, then errors.jsonl, summary.json and, last, index.json (the model's identity, the
parts' sha256). A part is planned as tokenize plans a shard (lumo_ray/data/shard_plan.py), so a
part's bytes depend on the manifest and the config only, never on how many actors ran.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..data.manifest import ErrorRecord, write_errors
from ..data.shards import HashingWriter, file_sha256
from ..storage import Loc, PathLike, locate

Key = tuple[str, int]  # (split, part index)
FORMAT = "lumo-embeddings-v1"


def part_of(out: Loc, key: Key) -> Loc:
    return out / key[0] / f"part-{key[1]:06d}.parquet"


def stats_of(part: Loc) -> Loc:
    return part.with_name(part.name[: -len(".parquet")] + ".stats.json")


def parquet_bytes(ids: list[str], split: str, image: np.ndarray, text: np.ndarray,
                  patches: np.ndarray | None = None) -> bytes:
    """One part as Parquet bytes (no timestamps: the same rows give the same bytes). image, text:
    [rows, d]; patches (optional): [rows, patches, d]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = int(image.shape[-1])
    vec = pa.list_(pa.float32(), dim)
    cols = {"id": pa.array(ids, pa.string()), "split": pa.array([split] * len(ids), pa.string()),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1), pa.float32()), dim),
            "text": pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1), pa.float32()), dim)}
    fields = [("id", pa.string()), ("split", pa.string()), ("image", vec), ("text", vec)]
    if patches is not None:
        n = int(patches.shape[1])
        inner = pa.FixedSizeListArray.from_arrays(pa.array(patches.reshape(-1), pa.float32()), dim)
        cols["patches"] = pa.FixedSizeListArray.from_arrays(inner, n)
        fields.append(("patches", pa.list_(vec, n)))
    table = pa.table(cols, schema=pa.schema(fields))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_part(out: Loc, key: Key, ids: list[str], image: np.ndarray, text: np.ndarray, errors: list[dict],
               digest: str, no_image: int = 0, patches: np.ndarray | None = None) -> dict:
    """The part and its stats (temp name, then moved: a part that exists is complete). Run by the
    worker that embedded it."""
    data = parquet_bytes(ids, key[0], image, text, patches)
    part = part_of(out, key)
    with part.atomic_writer() as fh:
        w = HashingWriter(fh)
        w.write(data)
    st = {"split": key[0], "index": key[1], "rows": len(ids), "bytes": w.n, "sha256": w.sha.hexdigest(),
          "input_digest": digest, "errors": errors, "no_image": no_image}
    stats_of(part).write_text(json.dumps(st, indent=1, sort_keys=True) + "\n")
    return st


def finished_parts(out: Loc, digests: dict[Key, str]) -> dict[Key, dict]:
    """The stats of every part already written for these inputs (a re-run skips them)."""
    done = {}
    for key, digest in sorted(digests.items()):
        part, sp = part_of(out, key), stats_of(part_of(out, key))
        part.with_name(part.name + ".tmp").unlink(missing_ok=True)
        if not (part.exists() and sp.exists()):
            continue
        try:
            st = json.loads(sp.read_text())
        except json.JSONDecodeError:
            continue
        if st.get("input_digest") == digest and file_sha256(part) == st.get("sha256"):
            done[key] = st
    return done


def finish(out: Loc, stats: dict[Key, dict], read_errors: list[ErrorRecord], model: dict, config_digest: str) -> dict:
    """errors.jsonl, summary.json, then index.json (last: its presence means the folder is complete)."""
    keys = sorted(stats)
    errors = [e.to_dict() for e in read_errors] + [e for k in keys for e in stats[k]["errors"]]
    write_errors([ErrorRecord(**e) for e in errors], out / "errors.jsonl")
    rows = sum(stats[k]["rows"] for k in keys)
    summary = {"rows": rows, "errors": len(errors), "no_image": sum(stats[k].get("no_image", 0) for k in keys),
               "per_split": {s: sum(stats[k]["rows"] for k in keys if k[0] == s) for s in sorted({k[0] for k in keys})},
               "error_reasons": dict(Counter(e["reason"] for e in errors).most_common())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    index = {"format": FORMAT, "model": model, "config_digest": config_digest, "rows": rows,
             "parts": [{"name": f"{k[0]}/{part_of(out, k).name}", "rows": stats[k]["rows"],
                        "bytes": stats[k]["bytes"], "sha256": stats[k]["sha256"]} for k in keys]}
    (out / "index.json").write_atomic(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return summary


def verified_index(path: PathLike) -> dict:
    """index.json of a finished embeddings folder, with its own sha256 (what a codebook records)."""
    from ..errors import UserError

    root = locate(path)
    if not (root / "index.json").exists():
        raise UserError("embeddings", root, "has no index.json", "run `lumo data embed` into it (to the end)")
    data = (root / "index.json").read_bytes()
    return {**json.loads(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_table(root: Loc, name: str, sha256: str, columns: list[str] | None = None):
    """One part as a pyarrow table, refusing bytes that are not the ones index.json records."""
    import pyarrow.parquet as pq

    from ..errors import UserError

    data = (locate(root) / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError("embeddings part", locate(root) / name, "sha256 does not match index.json",
                        "its bytes changed after `lumo data embed` wrote it; embed again into a fresh folder")
    f = pq.ParquetFile(io.BytesIO(data))
    for c in columns or []:
        if c not in f.schema_arrow.names:
            raise UserError("embeddings column", c, f"is not in {locate(root) / name}",
                            "give image or text (patches: embed with data.embed.patches=true)")
    return f.read(columns=columns)  # only these decoded: `patches` is many times the rest


def column(t, name: str) -> np.ndarray:
    """A vector column as float32 [rows, d]; `patches` as [rows * patches, d]."""
    arr = t.column(name).combine_chunks()
    if name == "patches":
        return arr.values.values.to_numpy(zero_copy_only=False).reshape(-1, arr.type.value_type.list_size)
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def read_part(root: Loc, name: str, sha256: str, col: str) -> np.ndarray:
    return column(read_table(root, name, sha256, [col]), col)


@dataclass
class Embeddings:
    ids: list[str]
    splits: list[str]
    image: np.ndarray  # [n, d] float32, unit rows
    text: np.ndarray
    model: dict


def read_embeddings(path: PathLike) -> Embeddings:
    """Every part of a finished embeddings folder, in index order, each checked against its sha256."""
    root = locate(path)
    index = verified_index(root)
    ids, splits, image, text = [], [], [], []
    for p in index["parts"]:
        t = read_table(root, p["name"], p["sha256"], ["id", "split", "image", "text"])
        image.append(column(t, "image"))
        text.append(column(t, "text"))
        ids += t.column("id").to_pylist()
        splits += t.column("split").to_pylist()
    dim = index["model"].get("dim", 0)
    cat = (lambda xs: np.concatenate(xs).astype(np.float32) if xs else np.zeros((0, dim), np.float32))
    return Embeddings(ids, splits, cat(image), cat(text), index["model"])
