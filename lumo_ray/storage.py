"""Where lumo reads and writes: a local path, a shared-filesystem path, or an object-store URI
(`s3://bucket/prefix`, `gs://bucket/prefix`, anything `pyarrow.fs.FileSystem.from_uri` accepts).

`locate(x)` turns a path or URI into a `Loc`: the pyarrow filesystem, the path on it, and the URI
naming it. Children keep the URI's query string, so `s3://b/p?endpoint_override=h:9000&scheme=http`
/ "index.json" is `s3://b/p/index.json?endpoint_override=h:9000&scheme=http`. Local paths are made
absolute (Ray workers run in another working directory) and are handled with plain file I/O, so
local outputs are byte-for-byte what they were before URIs existed. Credentials come from the
usual environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, instance roles, GOOGLE_APPLICATION_
CREDENTIALS); keep them out of URIs, which end up in logs and reports.

Write semantics, which resume and verify rely on:
- local / shared FS: `write_atomic` writes `<name>.tmp`, fsyncs and renames: atomic.
- object store: `write_atomic` uploads `<name>.tmp`, then moves it (server-side copy + delete). A
  reader of the final key sees the old object or the whole new one, never a partial upload (an
  interrupted or failed upload only ever lands on the `.tmp` key), but the move is not one atomic
  step: a crash between copy and delete leaves a stale `.tmp` that the next run removes. Objects
  over 5 GB cannot be server-side copied in one request; shards are far smaller.
Nothing depends on renaming across several objects: tokenize writes a tar, then its stats file
(sha256 + input digest), then index.json last, and a re-run only trusts a tar whose sha256 equals
its stats; readers only trust a directory that has index.json. S3 and GCS give strong
read-after-write consistency for objects and listings, so a key written is a key read.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
READ_BUFFER = 8 << 20  # object stores: one buffered read stream, not one ranged GET per small read


def is_uri(p: object) -> bool:
    """True for `scheme://...` other than file:// (which is a local path)."""
    return isinstance(p, str) and bool(_SCHEME.match(p)) and not p.lower().startswith("file://")


class Loc:
    """A file or directory on some filesystem; `str(loc)` is the absolute path or the URI."""

    __slots__ = ("fs", "path", "_uri")

    def __init__(self, fs: pafs.FileSystem, path: str, uri: tuple[str, str, str, str] | None = None):
        self.fs, self.path, self._uri = fs, path, uri  # _uri: (scheme, netloc, path, query); None = local

    # -- naming ---------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self._uri is None

    @property
    def local(self) -> Path:
        if self._uri is not None:
            raise ValueError(f"{self} is not a local path")
        return Path(self.path)

    def __str__(self) -> str:
        return self.path if self._uri is None else urlunsplit((*self._uri, ""))

    def __repr__(self) -> str:
        return f"Loc({str(self)!r})"

    def __fspath__(self) -> str:  # lets open()/Path()/tarfile take a local Loc
        if self._uri is not None:
            raise TypeError(f"{self} is a URI, not a local path")
        return self.path

    def __eq__(self, other) -> bool:
        return isinstance(other, Loc) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str | os.PathLike) -> "Loc":
        name = str(name).strip("/")
        path = f"{self.path.rstrip('/')}/{name}"
        if self._uri is None:
            return Loc(self.fs, str(Path(self.path) / name), None)
        s, n, p, q = self._uri
        return Loc(self.fs, path, (s, n, f"{p.rstrip('/')}/{name}", q))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Loc":
        if self._uri is None:
            return Loc(self.fs, str(Path(self.path).parent), None)
        s, n, p, q = self._uri
        return Loc(self.fs, self.path.rstrip("/").rsplit("/", 1)[0], (s, n, p.rstrip("/").rsplit("/", 1)[0], q))

    def with_name(self, name: str) -> "Loc":
        return self.parent / name

    # -- queries --------------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        return int(self._info().size)

    def files(self) -> dict[str, pafs.FileInfo]:
        """Every file below this directory: relative path -> its FileInfo (size, mtime)."""
        sel = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        base = self.path.rstrip("/") + "/"
        return {i.path[len(base):]: i for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File and i.path.startswith(base)}

    def children(self) -> list[str]:
        """Names of the files directly in this directory (not below it), sorted."""
        sel = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def glob(self, pattern: str = "*") -> list["Loc"]:
        """Files below this directory whose relative path matches `pattern` (fnmatch: `*` spans '/')."""
        return [self / r for r in sorted(self.files()) if fnmatch.fnmatchcase(r, pattern)]

    # -- reading --------------------------------------------------------------------------------
    def open_read(self) -> BinaryIO:
        """A sequential binary reader (a buffered stream on object stores)."""
        if self._uri is None:
            return open(self.path, "rb")
        return self.fs.open_input_stream(self.path, compression=None, buffer_size=READ_BUFFER)

    def read_bytes(self) -> bytes:
        with self.open_read() as fh:
            return fh.read()

    def read_range(self, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` (one ranged read on an object store)."""
        if self._uri is None:
            with open(self.path, "rb") as fh:
                fh.seek(start)
                return fh.read(length)
        with self.fs.open_input_file(self.path) as fh:
            return fh.read_at(length, start)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # -- writing --------------------------------------------------------------------------------
    def mkdir(self) -> None:
        """Create this directory and its parents (object stores: a marker, harmless)."""
        if self._uri is None:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self.path, recursive=True)

    def open_write(self) -> BinaryIO:
        """A plain (non-atomic) binary writer; parents are created."""
        if self._uri is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "wb")
        return self.fs.open_output_stream(self.path, compression=None)

    def write_bytes(self, data: bytes) -> None:
        with self.open_write() as fh:
            fh.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    @contextlib.contextmanager
    def atomic_writer(self) -> Iterator[BinaryIO]:
        """Write `<name>.tmp`, then put it in place (see the module docstring for what that promises)."""
        tmp = self.with_name(self.name + ".tmp")
        if self._uri is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp.path, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp.path, self.path)
            return
        # pyarrow completes an upload when the stream closes, even after an error: write to .tmp and
        # only move it into place when the body ran to the end.
        with self.fs.open_output_stream(tmp.path, compression=None) as fh:
            yield fh
        self.fs.move(tmp.path, self.path)

    def write_atomic(self, data: bytes | str) -> None:
        with self.atomic_writer() as fh:
            fh.write(data.encode() if isinstance(data, str) else data)

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:  # some stores report a missing key as a generic OSError
            if self.exists() or not missing_ok:
                raise

    def rmtree(self) -> None:
        if not self.exists():
            return
        try:
            self.fs.delete_dir(self.path)
        except FileNotFoundError:
            # GCS: pyarrow deletes the objects, then the `<dir>/` marker object, which a prefix that
            # was only written to (never mkdir'ed) does not have: a 404 after everything is gone.
            if self.exists():
                raise


PathLike = Union[str, os.PathLike, Loc]


def locate(p: PathLike) -> Loc:
    """A Loc for a path or URI; relative local paths become absolute (against this process's cwd)."""
    if isinstance(p, Loc):
        return p
    s = os.fspath(p)
    if s.lower().startswith("file://"):
        s = urlsplit(s).path
    if not is_uri(s):
        return Loc(pafs.LocalFileSystem(), str(Path(s).expanduser().resolve()), None)
    fs, path = pafs.FileSystem.from_uri(s)
    u = urlsplit(s)
    return Loc(fs, path.rstrip("/"), (u.scheme, u.netloc, u.path.rstrip("/"), u.query))


def resolve(p: PathLike) -> str:
    """The absolute path or the URI unchanged: what to hand a Ray worker (other cwd, other node)."""
    return str(locate(p))


def fs_and_path(p: PathLike) -> tuple[pafs.FileSystem, str]:
    loc = locate(p)
    return loc.fs, loc.path


def where(loc: Loc) -> Union[Path, str]:
    """What public functions return for a location they wrote: a Path when local, else the URI."""
    return loc.local if loc.is_local else str(loc)


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[Path]:
    """A local path holding this file's bytes: itself when local, else a temporary download (a path
    that does not exist when the object does not)."""
    loc = locate(p)
    if loc.is_local:
        yield loc.local
        return
    with tempfile.TemporaryDirectory(prefix="lumo-dl-") as d:
        dst = Path(d) / loc.name
        if loc.exists():
            dst.write_bytes(loc.read_bytes())
        yield dst


def download_dir(p: PathLike, dst: str | Path) -> Path:
    """Copy a directory (local or remote) into the local directory `dst`; returns dst."""
    loc, dst = locate(p), Path(dst)
    if not loc.is_dir():
        raise FileNotFoundError(f"{loc}: no such directory")
    dst.mkdir(parents=True, exist_ok=True)
    if loc.is_local:
        shutil.copytree(loc.local, dst, dirs_exist_ok=True)
    else:
        # A recursive GCS listing holds objects only (no implied directories), so copy_files would
        # not create the local subdirectories of a tree that was written without mkdir markers.
        for f in loc.glob("*"):
            (dst / f.path[len(loc.path) + 1:]).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(loc.path, str(dst), source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
    return dst


# Files a run directory mirror leaves alone: the trainers' checkpoints (trainers/core.py CHECKPOINTS,
# tests/test_storage_uri.py holds the two names together) reach the object store through Ray Train's
# storage_path, and `ray/` is that storage when it defaults to the run directory.
MIRROR_SKIP = ("checkpoints/", "ray/")


def runs_root() -> Path:
    """Where URI run directories are staged and cached: per user, under the temp directory."""
    return Path(tempfile.gettempdir()) / f"lumo-runs-{getattr(os, 'getuid', lambda: 0)()}"


class RunDir:
    """A run directory that may be an object-store URI. Work happens in `local`: the directory itself
    when it is a path, else a staging directory private to this process (workers on other nodes
    stage their own copy). `pull()` fetches what the URI holds, `push()` uploads what changed, so a
    run directory on s3:// or gs:// ends up with the same files a local one has (checkpoints
    excepted, see MIRROR_SKIP)."""

    def __init__(self, p: PathLike, shared: bool = False):
        self.loc = locate(p)
        if self.loc.is_local:
            self.local = self.loc.local
        else:
            # Per process by default: two ranks on one node must not write one staging copy at once.
            # shared=True (read-only consumers, fetch_run) keeps one cache per URI.
            key = hashlib.sha256(str(self.loc).encode()).hexdigest()[:16]
            self.local = runs_root() / (key if shared else f"{key}-{os.getpid()}")
            if not shared:  # a crashed process with a recycled pid may have left one: start empty
                shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        # beside the copy, not in it: remote (size, mtime) of each file last pulled
        self._state = self.local.with_name(self.local.name + ".pulled.json")
        if self.remote and not shared:
            self._state.unlink(missing_ok=True)
        self._pushed: dict[str, tuple[int, int]] = {}

    @property
    def remote(self) -> bool:
        return not self.loc.is_local

    def __str__(self) -> str:
        return str(self.loc)

    def discard(self) -> None:
        """Remove the staging copy of a URI run directory (a path is left alone)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
            self._state.unlink(missing_ok=True)

    def pull(self) -> Path:
        """Make `local` hold the URI's files, MIRROR_SKIP excepted: download what is new or changed
        since the last pull, delete what the URI no longer has; returns `local`."""
        if not self.remote:
            return self.local
        remote = {r: [int(i.size), i.mtime_ns] for r, i in self.loc.files().items() if not r.startswith(MIRROR_SKIP)}
        try:
            seen = json.loads(self._state.read_text())
        except (OSError, ValueError):
            seen = {}
        for f in [f for f in self.local.rglob("*") if f.is_file()]:
            rel = f.relative_to(self.local).as_posix()
            if rel not in remote and not f.name.endswith(".part"):
                f.unlink(missing_ok=True)  # gone from the URI (e.g. a re-export with other files)
        for rel, info in sorted(remote.items()):
            dst = self.local / rel
            if info[1] is not None and seen.get(rel) == info and dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            # whole files only: processes sharing a read cache (fetch_run) may pull at once
            part = dst.with_name(f"{dst.name}.{os.getpid()}.part")
            part.write_bytes((self.loc / rel).read_bytes())
            os.replace(part, dst)
            st = dst.stat()
            self._pushed[rel] = (st.st_size, st.st_mtime_ns)
            seen[rel] = info
        tmp = self._state.with_name(f"{self._state.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, self._state)
        return self.local

    def push(self) -> None:
        """Upload the files of `local` that are new or changed since the last push or pull."""
        if not self.remote:
            return
        for f in sorted(self.local.rglob("*")):
            rel = f.relative_to(self.local).as_posix()
            if not f.is_file() or rel.startswith(MIRROR_SKIP) or f.name.endswith((".tmp", ".part")):
                continue
            st = f.stat()
            if self._pushed.get(rel) != (st.st_size, st.st_mtime_ns):
                (self.loc / rel).write_atomic(f.read_bytes())
                self._pushed[rel] = (st.st_size, st.st_mtime_ns)


def fetch_run(p: PathLike) -> Path:
    """A local directory holding the run directory at `p`: itself, or a per-user cache of the URI
    (`runs_root()/<hash>`) brought up to date with it, for commands that read a run (eval, generate,
    a base LM or warm-up export)."""
    loc = locate(p)
    if loc.is_local:
        return loc.local
    if not loc.is_dir():
        raise FileNotFoundError(f"{loc}: no such run directory on the object store")
    return RunDir(p, shared=True).pull()


@contextlib.contextmanager
def output_dir(p: PathLike) -> Iterator[Path]:
    """A local directory to write a command's outputs into; a URI gets them uploaded on success
    and its staging copy removed either way."""
    run = RunDir(p)
    try:
        yield run.local
        run.push()
    finally:
        run.discard()


def ray_storage(p: PathLike) -> dict:
    """RunConfig kwargs for a Ray Train / Tune storage_path that may be an object-store URI: Ray gets
    the bare path plus the pyarrow filesystem (which carries the URI's options, e.g. endpoint_override)."""
    loc = locate(p)
    return {"storage_path": loc.path, "storage_filesystem": None if loc.is_local else loc.fs}


def latest_ray_checkpoint(storage: PathLike, name: str, marker: str) -> Optional[Loc]:
    """The newest `checkpoint_*` directory holding `marker` in a Ray Train run `<storage>/<name>`
    (Ray names them by creation time, so name order is age order)."""
    root = locate(storage) / name
    cks = sorted({str(m.parent): m.parent for m in root.glob(f"checkpoint_*/{marker}") if m.parent.parent == root}.items())
    return cks[-1][1] if cks else None
