"""Deterministic WebDataset shards (docs/stage2_data.md): layout, sample encoding, tar writing and reading.

A shard is `<out>/<split>/shard-NNNNNN.tar`. Samples sit in manifest order, each sample's members
sorted by name, with fixed mtime/uid/gid/mode, so one manifest + config gives byte-identical tars
whatever the number of actors or machines. Beside each finished tar a small stats file records its
sha256 and the digest of its inputs, which is how a re-run knows to skip it.

Every location may be a local path or an object-store URI (lumo_ray.storage); tars are written and
read as one sequential stream, hashed on the way through.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import BinaryIO, Iterator

import numpy as np

from ..storage import Loc, PathLike, locate

ARRAY_FIELDS = ("prompt", "text", "image", "audio")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(sample_id: str) -> str:
    """WebDataset key derived from the id (ids may hold dots, spaces or '#', which keys cannot)."""
    return hashlib.sha256(sample_id.encode()).hexdigest()[:24]


def token_dtype(total: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds every id of the token space."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if total - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample_id: str, arrays: dict[str, np.ndarray], meta: dict, dtype: np.dtype) -> dict[str, bytes]:
    """Members of one sample: `<key>.<field>.npy` per token array and `<key>.json`."""
    key = sample_key(sample_id)
    members = {f"{key}.{name}.npy": npy_bytes(np.asarray(arr).astype(dtype))
               for name, arr in arrays.items()}
    members[f"{key}.json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return members


class HashingWriter:
    """Counts and sha256-hashes the bytes written through it (tarfile needs write + tell)."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        self.fh.write(b)
        return len(b)

    def tell(self) -> int:
        return self.n


class HashingReader:
    """sha256 of everything read through it; `drain()` reads the rest so the digest covers the file."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        b = self.fh.read(size)
        self.sha.update(b)
        self.n += len(b)
        return b

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def file_sha256(path: PathLike) -> str:
    with locate(path).open_read() as fh:
        return HashingReader(fh).drain()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# tarfile spends ~40 us of Python on each member; a shard's members differ only in name, size and
# checksum, so the header is tarfile's own (this Python's bytes, field for field) with those three set
_USTAR = _tar_info("", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
_USTAR = _USTAR[:148] + b" " * 8 + _USTAR[156:]  # the checksum is summed over spaces in its own field


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a member of ours (mode 0644, uid/gid 0, mtime 0)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8 ** 11:  # a prefix split or a size field tarfile handles itself
        return _tar_info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    buf = bytearray(_USTAR)
    buf[: len(raw)] = raw
    buf[124:136] = b"%011o\0" % size
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def write_tar(path: PathLike, samples: list[dict[str, bytes]]) -> dict:
    """Write samples (in the given order) to a temp name, then move it: a tar at `path` is complete.
    The bytes are tarfile's USTAR stream for these members (tests/test_tokenize_verify.py checks)."""
    loc = locate(path)
    with loc.atomic_writer() as fh:
        out = HashingWriter(fh)
        for members in samples:
            parts = []
            for name in sorted(members):
                data = members[name]
                parts += [tar_header(name, len(data)), data, b"\0" * (-len(data) % tarfile.BLOCKSIZE)]
            out.write(b"".join(parts))
        end = out.n + 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
    return {"bytes": out.n, "sha256": out.sha.hexdigest(), "samples": len(samples)}


def stats_path(tar_path: PathLike) -> Loc:
    p = locate(tar_path)
    return p.with_name(p.name[: -len(".tar")] + ".stats.json")


def shard_is_complete(tar_path: PathLike, input_digest: str) -> dict | None:
    """The recorded stats when the tar exists, matches its recorded sha256 and was made from these inputs."""
    tar, sp = locate(tar_path), stats_path(tar_path)
    if not sp.exists() or not tar.exists():
        return None
    try:
        st = json.loads(sp.read_text())
    except json.JSONDecodeError:
        return None
    if st.get("input_digest") != input_digest or st.get("bytes", tar.size()) != tar.size() \
            or file_sha256(tar) != st.get("sha256"):
        return None
    return st


def iter_tar(src: PathLike | BinaryIO) -> Iterator[dict]:
    """Samples of one shard in stored order: {'__key__', 'json': dict, '<field>': np.ndarray}.

    `src` is a path/URI or an open binary stream; the tar is read front to back in one pass."""
    if not hasattr(src, "read"):
        with locate(src).open_read() as fh:
            yield from iter_tar(fh)
        return
    cur: dict | None = None
    with tarfile.open(fileobj=src, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            data = tar.extractfile(m).read()
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    yield cur
                cur = {"__key__": key}
            if ext == "json":
                cur["json"] = json.loads(data)
            elif ext.endswith(".npy"):
                cur[ext[: -len(".npy")]] = np.load(io.BytesIO(data), allow_pickle=False)
            else:
                cur[ext] = data
    if cur is not None:
        yield cur


def read_verified(shards_dir: PathLike, entry: dict) -> list[dict]:
    """Every sample of the shard that index.json `entry` names, after checking the bytes read against
    its sha256: a shard changed after tokenize wrote it (one flipped byte) is refused, by name."""
    from ..errors import UserError

    loc = locate(shards_dir) / entry["name"]
    todo = "re-run `lumo data tokenize` into a fresh folder (or restore the shard from its source)"
    if not loc.exists():
        raise UserError("shard", loc, "listed in index.json but missing", todo)
    with loc.open_read() as raw:
        fh = HashingReader(raw)  # one pass: the samples are parsed and the bytes hashed together
        try:
            samples = list(iter_tar(fh))
        except (tarfile.TarError, ValueError, EOFError, OSError) as e:
            raise UserError("shard", loc, f"unreadable ({type(e).__name__}: {e})", todo) from None
        sha = fh.drain()
    if sha != entry["sha256"]:
        raise UserError("shard", loc, f"sha256 {sha[:16]}... does not match index.json's {entry['sha256'][:16]}...: "
                        "its bytes changed after tokenize wrote it", todo)
    return samples


def load_index(shards_dir: PathLike) -> dict:
    p = locate(shards_dir) / "index.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: the shards are incomplete (index.json is written last)")
    return json.loads(p.read_text())
