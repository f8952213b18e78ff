"""The token space: the ABI every shard and checkpoint carries (docs/stage3_uti.md).

Ordered, contiguous, non-overlapping ranges of global ids: TEXT, SPECIAL, IMAGE, AUDIO_CB0..K-1.
The identity hash covers layout and adapter identity only: never paths, timestamps, devices or
dtypes, so two builds of one config on two machines hash the same.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

VERSION = 1
AUDIO_SERIALIZATION = "flatten_by_time_interleaved_codebooks"


class TokenSpaceError(ValueError):
    """An invalid layout or an id that does not belong where it is used."""


class TokenSpaceMismatch(TokenSpaceError):
    """Two token spaces that must be the same are not."""


@dataclass(frozen=True)
class Range:
    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        """Last id, inclusive."""
        return self.start + self.size - 1

    @property
    def stop(self) -> int:
        return self.start + self.size

    def __contains__(self, gid: int) -> bool:
        return self.start <= gid < self.stop


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k}".lstrip(".")
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return f"{path}[{min(len(a), len(b))}]" if len(a) != len(b) else None
    return None if a == b else (path.lstrip(".") or "<root>")


class TokenSpace:
    """Layout + adapter identities. Build with `TokenSpace.from_sizes` or load with `load`."""

    def __init__(self, ranges: list[Range], specials: list[str], special_slots: int,
                 adapters: dict[str, dict], pad_multiple: int = 64, version: int = VERSION):
        self.ranges = list(ranges)
        self.specials = list(specials)
        self.special_slots = int(special_slots)
        self.adapters = {k: dict(v) for k, v in adapters.items()}
        self.pad_multiple = int(pad_multiple)
        self.version = int(version)
        self._by_name = {r.name: r for r in self.ranges}
        self.validate()
        self._starts = np.array([r.start for r in self.ranges], dtype=np.int64)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_sizes(cls, *, text_vocab: int, specials: list[str], special_slots: int,
                   image_codebook: int | None, audio_codebooks: int, audio_codebook_size: int | None,
                   adapters: dict[str, dict], pad_multiple: int = 64) -> "TokenSpace":
        ranges, nxt = [], 0
        for name, size in [("TEXT", text_vocab), ("SPECIAL", special_slots)]:
            ranges.append(Range(name, nxt, int(size)))
            nxt += int(size)
        if image_codebook:
            ranges.append(Range("IMAGE", nxt, int(image_codebook)))
            nxt += int(image_codebook)
        for k in range(audio_codebooks or 0):
            ranges.append(Range(f"AUDIO_CB{k}", nxt, int(audio_codebook_size)))
            nxt += int(audio_codebook_size)
        return cls(ranges, specials, special_slots, adapters, pad_multiple)

    # -- identity ---------------------------------------------------------------------------
    def identity(self) -> dict:
        return {
            "version": self.version,
            "ranges": [{"name": r.name, "start": r.start, "size": r.size} for r in self.ranges],
            "special_slots": self.special_slots,
            "specials": self.specials,
            "pad_multiple": self.pad_multiple,
            "adapters": self.adapters,
        }

    @property
    def hash(self) -> str:
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()

    def to_json(self) -> dict:
        d = self.identity()
        d["total"] = self.total
        d["padded_size"] = self.padded_size
        d["special_ids"] = {n: self.special_id(n) for n in self.specials}
        d["hash"] = self.hash
        return d

    def save(self, out_dir: Any) -> Any:
        """token_space.json + token_space.sha256 into a folder (a path or an object-store URI);
        returns the json file's Path when local, else its URI."""
        from .storage import locate, where

        out = locate(out_dir)
        out.mkdir()
        (out / "token_space.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        (out / "token_space.sha256").write_text(self.hash + "\n")
        return where(out / "token_space.json")

    @classmethod
    def from_json(cls, d: dict) -> "TokenSpace":
        ts = cls([Range(r["name"], r["start"], r["size"]) for r in d["ranges"]], d["specials"],
                 d["special_slots"], d["adapters"], d.get("pad_multiple", 64), d.get("version", VERSION))
        if "hash" in d and d["hash"] != ts.hash:
            raise TokenSpaceError(
                f"token_space.json records hash {d['hash']} but its content hashes to {ts.hash}")
        return ts

    @classmethod
    def load(cls, path: str | Path) -> "TokenSpace":
        p = Path(path)
        if p.is_dir():
            p = p / "token_space.json"
        return cls.from_json(json.loads(p.read_text()))

    def ensure_same(self, other: "TokenSpace", what: str = "token space") -> None:
        """Refuse a mismatch, naming both hashes and the first differing field."""
        if self.hash == other.hash:
            return
        field = first_difference(self.identity(), other.identity())
        raise TokenSpaceMismatch(
            f"{what} mismatch: expected hash {self.hash}, got {other.hash}; "
            f"first differing field: {field}")

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        if not self.ranges or self.ranges[0].name != "TEXT" or self.ranges[0].start != 0:
            raise TokenSpaceError("the first range must be TEXT starting at id 0")
        if len(self.ranges) < 2 or self.ranges[1].name != "SPECIAL":
            raise TokenSpaceError("the second range must be SPECIAL")
        for a, b in zip(self.ranges, self.ranges[1:]):
            if b.start != a.stop:
                raise TokenSpaceError(
                    f"ranges not contiguous/non-overlapping: {a.name} ends at {a.end}, {b.name} starts at {b.start}")
        for r in self.ranges:
            if r.size <= 0:
                raise TokenSpaceError(f"range {r.name} has size {r.size}")
        if len(set(self.specials)) != len(self.specials):
            raise TokenSpaceError("duplicate named special tokens")
        if len(self.specials) > self.special_slots:
            raise TokenSpaceError(f"{len(self.specials)} named specials exceed {self.special_slots} slots")
        if self._by_name["SPECIAL"].size != self.special_slots:
            raise TokenSpaceError("SPECIAL range size differs from special_slots")
        text = self.adapters.get("text", {})
        if "vocab_size" in text and text["vocab_size"] != self._by_name["TEXT"].size:
            raise TokenSpaceError(
                f"TEXT range size {self._by_name['TEXT'].size} != text adapter vocab {text['vocab_size']}")
        img = self.adapters.get("image")
        if img and img.get("kind") != "none":
            if "IMAGE" not in self._by_name or self._by_name["IMAGE"].size != img.get("codebook_size"):
                raise TokenSpaceError(
                    f"IMAGE range does not match image adapter codebook_size {img.get('codebook_size')}")
        aud = self.adapters.get("audio")
        k = len(self.audio_ranges)
        if aud and aud.get("kind") != "none":
            if k != aud.get("num_codebooks"):
                raise TokenSpaceError(f"{k} audio ranges != audio adapter num_codebooks {aud.get('num_codebooks')}")
            for r in self.audio_ranges:
                if r.size != aud.get("codebook_size"):
                    raise TokenSpaceError(f"{r.name} size {r.size} != audio codebook_size {aud.get('codebook_size')}")
        if self.pad_multiple <= 0:
            raise TokenSpaceError("pad_multiple must be positive")

    # -- sizes ------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return self.ranges[-1].stop

    @property
    def padded_size(self) -> int:
        m = self.pad_multiple
        return (self.total + m - 1) // m * m

    @property
    def text_vocab(self) -> int:
        return self._by_name["TEXT"].size

    @property
    def image_decodable(self) -> bool:
        """False for an encode-only image tokenizer (clip_kmeans records `decoder: none`)."""
        img = self.adapters.get("image") or {}
        return bool(img) and img.get("kind") != "none" and img.get("decoder") != "none"

    def require_image_decoder(self, what: str) -> None:
        """Refuse, in one line, work that needs image tokens turned back into pixels (text -> image)."""
        if not self.image_decodable:
            from .errors import UserError
            kind = (self.adapters.get("image") or {}).get("kind", "none")
            raise UserError(what, None, f"text-to-image needs an image decoder and the token space's image "
                            f"tokenizer ({kind}) has none", "leave t2i out, or tokenize with uti.image.kind vq or seed")

    def range(self, name: str) -> Range:
        if name not in self._by_name:
            raise TokenSpaceError(f"no range named {name}; ranges: {[r.name for r in self.ranges]}")
        return self._by_name[name]

    @property
    def audio_ranges(self) -> list[Range]:
        return [r for r in self.ranges if r.name.startswith("AUDIO_CB")]

    @property
    def num_codebooks(self) -> int:
        return len(self.audio_ranges)

    @property
    def has_image(self) -> bool:
        return "IMAGE" in self._by_name

    # -- lookups ----------------------------------------------------------------------------
    def special_id(self, name: str) -> int:
        if name not in self.specials:
            raise TokenSpaceError(f"unknown special token {name!r}; named specials: {self.specials}")
        return self._by_name["SPECIAL"].start + self.specials.index(name)

    def range_of(self, gid: int) -> Range:
        gid = int(gid)
        if gid < 0 or gid >= self.total:
            raise TokenSpaceError(
                f"id {gid} is outside the token space [0, {self.total})"
                + (" (a padded embedding row, never a valid token)" if gid < self.padded_size and gid >= 0 else ""))
        i = int(np.searchsorted(self._starts, gid, side="right") - 1)
        return self.ranges[i]

    def modality_of(self, gid: int) -> str:
        """'text', 'special', 'image' or 'audio'."""
        name = self.range_of(gid).name
        return {"TEXT": "text", "SPECIAL": "special", "IMAGE": "image"}.get(name, "audio")

    def image_to_global(self, codes: Iterable[int] | np.ndarray) -> np.ndarray:
        r = self.range("IMAGE")
        c = np.asarray(codes, dtype=np.int64)
        if c.size and (c.min() < 0 or c.max() >= r.size):
            raise TokenSpaceError(f"image code out of [0, {r.size}): min {c.min()} max {c.max()}")
        return c + r.start

    def global_to_image(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        r = self.range("IMAGE")
        g = np.asarray(ids, dtype=np.int64)
        bad = (g < r.start) | (g >= r.stop)
        if bad.any():
            raise TokenSpaceError(f"id {int(g[bad][0])} is not an IMAGE id [{r.start}, {r.end}]")
        return g - r.start

    def audio_code_to_global(self, codebook: int, code: int | np.ndarray) -> np.ndarray:
        r = self.audio_ranges[codebook]
        c = np.asarray(code, dtype=np.int64)
        if c.size and (c.min() < 0 or c.max() >= r.size):
            raise TokenSpaceError(f"audio code out of [0, {r.size}) in codebook {codebook}")
        return c + r.start

    def audio_to_global(self, codes: np.ndarray) -> np.ndarray:
        """codes [K, T] -> flat stream c[0][0], c[1][0], ..., c[K-1][0], c[0][1], ... (global ids)."""
        c = np.asarray(codes, dtype=np.int64)
        k = self.num_codebooks
        if c.ndim != 2 or c.shape[0] != k:
            raise TokenSpaceError(f"audio codes must have shape [{k}, T], got {list(c.shape)}")
        size = self.audio_ranges[0].size
        if c.size and (c.min() < 0 or c.max() >= size):
            raise TokenSpaceError(f"audio code out of [0, {size}): min {c.min()} max {c.max()}")
        starts = np.array([r.start for r in self.audio_ranges], dtype=np.int64)[:, None]
        return (c + starts).T.reshape(-1)

    def global_to_audio(self, ids: np.ndarray) -> np.ndarray:
        """Inverse of audio_to_global; refuses wrong length or phase."""
        g = np.asarray(ids, dtype=np.int64)
        k = self.num_codebooks
        if g.size % k:
            raise TokenSpaceError(f"audio stream length {g.size} is not a multiple of {k} codebooks")
        bad = self.audio_phase_errors(g)
        if bad:
            raise TokenSpaceError(f"audio codebook phase broken at position {bad[0]} (id {int(g[bad[0]])})")
        starts = np.array([r.start for r in self.audio_ranges], dtype=np.int64)
        return (g.reshape(-1, k) - starts[None, :]).T

    def audio_phase_errors(self, ids: np.ndarray) -> list[int]:
        """Positions p whose id is not in codebook p mod K."""
        g = np.asarray(ids, dtype=np.int64)
        k = self.num_codebooks
        pos = np.arange(g.size)
        rs = self.audio_ranges
        starts = np.array([r.start for r in rs])[pos % k]
        stops = np.array([r.stop for r in rs])[pos % k]
        return np.nonzero((g < starts) | (g >= stops))[0].tolist()

    def check_ids(self, ids: np.ndarray, modality: str) -> list[int]:
        """Positions whose id is outside the given modality's ids."""
        g = np.asarray(ids, dtype=np.int64)
        if modality == "audio":
            return self.audio_phase_errors(g)
        r = self.range({"text": "TEXT", "special": "SPECIAL", "image": "IMAGE"}[modality])
        return np.nonzero((g < r.start) | (g >= r.stop))[0].tolist()

    def table(self) -> str:
        rows = [("range", "start", "end", "size")]
        rows += [(r.name, str(r.start), str(r.end), str(r.size)) for r in self.ranges]
        rows += [("total", "", "", str(self.total)), ("padded", "", "", str(self.padded_size))]
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
        lines.insert(1, "  ".join("-" * x for x in w))
        return "\n".join(lines) + f"\nhash   {self.hash}"
