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
- local / shared FS: every write (`write_bytes`, `write_text`, `atomic_writer`, `write_atomic`, and
  `write_file` for plain paths) goes through `safe_writer`: the bytes land in `<name>.tmp`, created
  with O_CREAT|O_EXCL|O_NOFOLLOW in the destination's directory (a stale temp or a symlink planted at
  that name is unlinked first, never followed), then `os.replace` puts it on the final name. A rename
  replaces a symlink at the final name itself, never its target, so no write follows a symlink it did
  not create. A Loc built below another (`out / "train" / "x.tar"`) remembers `out` as its output
  folder: a destination whose directory resolves outside it (a symlinked subfolder) is refused with
  one line (UnsafeOutput). `write_atomic` also fsyncs: atomic and durable.
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

from .errors import UserError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
READ_BUFFER = 8 << 20  # object stores: one buffered read stream, not one ranged GET per small read


class UnsafeOutput(UserError):
    """An output path that resolves outside its output folder (a symlinked folder on the way)."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _real_dir(dest: Path, root: Union[str, os.PathLike, None]) -> Path:
    """The symlink-free directory `dest` lands in; refused when it is not inside `root`'s real path."""
    real = os.path.realpath(dest.parent)
    if root is not None:
        top = os.path.realpath(root)
        if not _inside(real, top):
            raise UnsafeOutput("output", dest, f"resolves to {os.path.join(real, dest.name)}, outside the output "
                               f"folder {root} (a symlink on the way)",
                               "remove the symlink, or write to another output folder")
    return Path(real)


def _open_dir(real: Path) -> int:
    """An fd of the checked directory (created when missing): the temp file and the rename happen
    relative to it, so a folder swapped after the check cannot redirect them."""
    real.mkdir(parents=True, exist_ok=True)
    dfd = os.open(real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW)
    st, now = os.fstat(dfd), os.stat(real)
    if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
        os.close(dfd)
        raise UnsafeOutput("output", real, "the folder changed while it was being opened", "re-run")
    return dfd


@contextlib.contextmanager
def safe_writer(dest: Union[str, os.PathLike], root: Union[str, os.PathLike, None] = None,
                fsync: bool = False) -> Iterator[BinaryIO]:
    """The one way lumo writes a local file: a binary writer on `<name>.tmp` (O_EXCL|O_NOFOLLOW, in
    the destination's directory), renamed onto `dest` when the body ends without error (removed
    when it raises). A symlink at `dest` or at its temp name is replaced, never followed; `root`:
    the output folder `dest` must resolve inside (refused with UnsafeOutput). fsync: flush to disk
    before the rename (atomic and durable)."""
    dest = Path(os.fspath(dest)).expanduser().absolute()
    dfd = _open_dir(_real_dir(dest, root))
    tmp = dest.name + ".tmp"
    try:
        try:
            os.unlink(tmp, dir_fd=dfd)  # a stale temp of a killed run, or a planted symlink: the name only
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o666, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                if fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, dest.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


def check_output(path: "PathLike", root: Union[str, os.PathLike, None] = None) -> None:
    """Refuse now (UnsafeOutput, one line) a local output path whose folder resolves outside `root`
    (default: the Loc's own output folder): a driver checks before its workers write there."""
    loc = locate(path)
    if loc.is_local:
        _real_dir(Path(loc.path), root if root is not None else loc.root)


def safe_move(src: Union[str, os.PathLike], dest: Union[str, os.PathLike],
              root: Union[str, os.PathLike, None] = None) -> None:
    """Rename a file this process wrote (`src`, e.g. in a staging folder of its own) onto `dest`, with
    safe_writer's rules: a symlink at `dest` is replaced, a folder outside `root` refused."""
    dest = Path(os.fspath(dest)).expanduser().absolute()
    dfd = _open_dir(_real_dir(dest, root))
    try:
        os.replace(os.path.abspath(src), dest.name, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def write_file(path: "PathLike", data: Union[bytes, str], root: Union[str, os.PathLike, None] = None,
               fsync: bool = False) -> None:
    """Write a whole file at a path or URI (str is UTF-8): safe_writer for local paths, `root` the
    output folder it must stay in; an object-store key is written as Loc.write_bytes does."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    loc = locate(path)
    if not loc.is_local:
        loc.write_bytes(raw)
        return
    with safe_writer(loc.path, root if root is not None else loc.root, fsync=fsync) as fh:
        fh.write(raw)


@contextlib.contextmanager
def staged_dir(dest: Union[str, os.PathLike], root: Union[str, os.PathLike, None] = None) -> Iterator[Path]:
    """For writers lumo does not control (Hugging Face save_pretrained, ...): a fresh folder beside
    `dest` (mkdtemp: created by this process, nothing planted in it) to write into; when the body
    ends, every file in it is moved onto the same relative name below `dest` with safe_move, in the
    order they were written (default root: dest's parent, so a symlinked `dest` folder is refused),
    then the staging folder goes."""
    dest = Path(os.fspath(dest)).expanduser().absolute()
    root = dest.parent if root is None else root
    real = _real_dir(dest, root)
    real.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=real))
    try:
        yield tmp
        files = [f for f in tmp.rglob("*") if f.is_file() and not f.is_symlink()]
        for f in sorted(files, key=lambda f: (f.stat().st_mtime_ns, str(f))):  # in the order written: last stays last
            safe_move(f, dest / f.relative_to(tmp), root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_uri(p: object) -> bool:
    """True for `scheme://...` other than file:// (which is a local path)."""
    return isinstance(p, str) and bool(_SCHEME.match(p)) and not p.lower().startswith("file://")


class Loc:
    """A file or directory on some filesystem; `str(loc)` is the absolute path or the URI."""

    __slots__ = ("fs", "path", "_uri", "root")

    def __init__(self, fs: pafs.FileSystem, path: str, uri: tuple[str, str, str, str] | None = None,
                 root: str | None = None):
        self.fs, self.path, self._uri = fs, path, uri  # _uri: (scheme, netloc, path, query); None = local
        self.root = root  # the output folder this Loc was built below (`out / name`): local writes stay in it

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
            return Loc(self.fs, str(Path(self.path) / name), None, self.root or self.path)
        s, n, p, q = self._uri
        return Loc(self.fs, path, (s, n, f"{p.rstrip('/')}/{name}", q))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Loc":
        if self._uri is None:
            up = str(Path(self.path).parent)
            return Loc(self.fs, up, None, self.root if self.root and _inside(up, self.root) else None)
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

    def open_write(self) -> contextlib.AbstractContextManager[BinaryIO]:
        """A binary writer (use it in `with`); parents are created. Local: safe_writer (the file
        appears whole at the end, no symlink followed, never outside `root`); object store: a stream."""
        if self._uri is None:
            return safe_writer(self.path, self.root)
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
            with safe_writer(self.path, self.root, fsync=True) as fh:
                yield fh
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
        # The folders resolved, the final name kept: a Loc names the file itself, never what a symlink
        # there points at (writes replace such a link; reads and opens still go through it).
        p = Path(s).expanduser().absolute()
        p = p.resolve() if p.name in ("", "..") else p.parent.resolve() / p.name
        return Loc(pafs.LocalFileSystem(), str(p), None)
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


# Files a run directory mirror leaves alone: the trainers' checkpoints (trainers/checkpoint.py CHECKPOINTS,
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
