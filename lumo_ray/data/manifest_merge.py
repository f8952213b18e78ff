"""Several manifests -> one (`lumo data tokenize --manifest A B ...`, the demo's data stage): their lines in
the order given, record ids unique across them. Beside manifest.py because it reads lines as the shard plan
does (shard_plan.iter_lines), which itself imports manifest.py."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

from ..errors import UserError
from ..storage import Loc, PathLike, locate, where
from .manifest import _dumps, manifest_base, parse_line
from .shard_plan import _text, iter_lines

MERGED = "manifest.jsonl"  # the merged manifest's name in tokenize's --out folder


def merge_manifests(paths: Sequence[PathLike], dest: PathLike) -> Union[Path, str]:
    """Several manifests -> one at `dest`: each file's lines in its own order, the files in the order
    given (A's lines, then B's), so the result is the same bytes as concatenating them. Only a record
    with relative media paths is rewritten (resolved against its own manifest's folder, as
    read_manifest does), so the merged file may live anywhere; any other line is copied byte for byte
    (a malformed one stays one, for tokenize's errors.jsonl). Record ids must be unique across the
    files: a repeated id is a UserError naming it and both manifests, raised in a first pass, before
    anything is written. Holds only the ids, never the records."""
    locs, out = [locate(p) for p in paths], locate(dest)
    if out in locs:
        raise UserError("manifest", dest, "is where the merged manifest goes", "give the manifests from elsewhere")

    def lines(loc: Loc):  # (line number, line ending in \n, id or None, record rewritten or None)
        base = manifest_base(loc)
        for n, (_, raw) in enumerate(iter_lines(loc), start=1):
            raw = raw if raw.endswith(b"\n") else raw + b"\n"  # a last line without one: the next file's stays apart
            text = _text(raw)
            rec, err = parse_line(text, n, loc, None)
            if err is not None and err.reason == "relative media path" and base is not None:
                rec, err = parse_line(text, n, loc, base)
                yield n, raw, err.id if err else rec.id, None if err else (_dumps(rec.to_dict()) + "\n").encode()
            else:
                yield n, raw, rec.id if rec else (err.id if err and err.reason == "relative media path" else None), None

    seen: dict[str, tuple[Loc, int]] = {}
    for loc in locs:
        for n, _, rid, _ in lines(loc):
            if rid is None:
                continue
            if rid in seen:
                first, line = seen[rid]
                raise UserError("manifest", loc, f"record id {rid!r} (line {n}) is also in {first} (line {line})",
                                "ids must be unique across the manifests given; drop or rename one")
            seen[rid] = (loc, n)
    with out.atomic_writer() as fh:
        for loc in locs:
            for _, raw, _, rewritten in lines(loc):
                fh.write(rewritten or raw)
    return where(out)
