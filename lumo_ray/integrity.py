"""Folders that prove themselves: a checkpoint, a run's export and a shipped preset carry SHA256SUMS
(`sha256sum -c` format: `<hex>  <relative path>` per file), written after the files it lists. A reader
verifies it before loading anything and refuses a mismatch with one line naming the file.

A digest proves the bytes are the ones the writer wrote, not that the writer is trusted: tensors are
still read without pickle (`load_tensors`: torch.load(weights_only=True)), so a crafted file with a
correct digest cannot run code either. No Ray, no torch at import.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

from .errors import UserError, one_line

MANIFEST = "SHA256SUMS"
# a shipped preset's folder (weights + meta.json + SHA256SUMS) that does not verify
PRESET_TODO = "reinstall the package (a preset rebuilt by hand: `sha256sum` its files into SHA256SUMS)"
PathLike = Union[str, Path]


class IntegrityError(UserError):
    """A folder's files do not match its SHA256SUMS (or it has none, or a tensor file needs pickle)."""


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listed(root: Path) -> list[str]:
    """Every file under root (relative, '/'-separated), except the manifest and top-level dotfiles
    (bookkeeping of whoever copies the folder, e.g. Ray Train's; nothing of ours reads them)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and not (rel.startswith(".") and "/" not in rel):
            out.append(rel)
    return out


def write_manifest(root: PathLike, known: Optional[dict[str, str]] = None) -> Path:
    """Hash every file under root into root/SHA256SUMS (last, so its presence means the files were all
    written). known: digests of files hashed elsewhere (another rank's shard, which this process may not
    see); they are listed as given, and not hashed again when present."""
    root = Path(root)
    digests = dict(known or {})
    for rel in _listed(root):
        if rel not in digests:
            digests[rel] = sha256_file(root / rel)
    from .storage import locate

    # atomic and durable, and never through a symlink planted at the name (storage's writer)
    locate(root / MANIFEST).write_atomic("".join(f"{d}  {rel}\n" for rel, d in sorted(digests.items())))
    return root / MANIFEST


def read_manifest(root: PathLike, what: str = "checkpoint", todo: str = "") -> dict[str, str]:
    root = Path(root)
    m = root / MANIFEST
    if not m.is_file():
        raise IntegrityError(what, root, f"no {MANIFEST} (an unfinished write, or one from before digests)", todo)
    out = {}
    for n, line in enumerate(m.read_text(errors="replace").splitlines(), 1):
        d, sep, rel = line.partition("  ")
        bad = not sep or len(d) != 64 or any(c not in "0123456789abcdef" for c in d)
        # a listed path stays inside the folder: no absolute paths, no '..'
        if bad or not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise IntegrityError(f"{what} {MANIFEST}", m, f"line {n} is not '<sha256>  <relative path>'", todo)
        out[rel] = d
    return out


def verify(root: PathLike, what: str = "checkpoint", todo: str = "") -> None:
    """Refuse, naming the first bad file, unless every file under root is listed in its SHA256SUMS with
    the right digest and every listed file is there."""
    root = Path(root)
    want = read_manifest(root, what, todo)
    for rel in _listed(root):
        if rel not in want:
            raise IntegrityError(f"{what} file", root / rel, f"not listed in {MANIFEST}", todo)
    for rel, d in sorted(want.items()):
        p = root / rel
        if not p.is_file():
            raise IntegrityError(f"{what} file", p, f"missing (listed in {MANIFEST})", todo)
        got = sha256_file(p)
        if got != d:
            raise IntegrityError(f"{what} file", p, f"sha256 {got[:16]}... does not match {MANIFEST} ({d[:16]}...)",
                                 todo)


def check(root: PathLike, what: str = "checkpoint") -> Optional[str]:
    """Why root does not verify (one line), or None when it does."""
    try:
        verify(root, what)
    except IntegrityError as e:
        return str(e)
    return None


def load_tensors(path: PathLike, what: str = "checkpoint file", todo: str = "") -> dict:
    """A torch.save'd mapping of tensors (and plain containers / numbers / strings), read without
    executing any pickled code: anything else is refused, naming the file."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a foreign global; RuntimeError for a non-torch file
        raise IntegrityError(what, path, f"not a plain tensor file ({_why(e)})", todo) from None
    if not isinstance(obj, dict):
        raise IntegrityError(what, path, f"holds a {type(obj).__name__}, not a mapping", todo)
    return obj


def _why(e: BaseException) -> str:
    """The line of torch's weights_only refusal that names what was refused (its first is advice)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    named = [s for s in lines if "GLOBAL" in s or "Unsupported" in s]
    return (named or [one_line(e)])[0][:200]


_VERIFIED: set = set()


def verify_once(root: PathLike, what: str, todo: str = "") -> None:
    """verify(), skipped when the folder's files (names, sizes, mtimes) are ones this process verified
    already: a shipped preset is loaded by every codec or model build."""
    root = Path(root)
    key = (str(root.resolve()), tuple((p.relative_to(root).as_posix(), s.st_size, s.st_mtime_ns)
                                      for p in sorted(root.rglob("*")) if p.is_file() for s in [p.stat()]))
    if key not in _VERIFIED:
        verify(root, what, todo)
        _VERIFIED.add(key)
