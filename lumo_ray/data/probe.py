"""Open a record's media and report what it is (docs/stage2_data.md), or why it is bad.

`probe_record` is a pure function of one record (and a minimum length): it never raises for bad
media, it returns an ErrorRecord with a short `reason` ('missing file', 'unreadable file' (a
symlink loop, permission denied), 'truncated audio', 'undecodable audio', 'undecodable image', 'too
short', 'missing modality', 'probe failed') and a `detail` naming the file. Good records come back
with `meta["probe"][modality]` filled.

libsndfile silently reads a truncated WAV (fewer frames than the header declares), so WAV files
are also checked at the RIFF level: a `data` chunk that runs past the end of the file is truncated.
"""
from __future__ import annotations

import copy
import hashlib
import struct
from pathlib import Path
from typing import Union

import numpy as np

from ..codecs.base import MediaError, media_file
from .manifest import TASK_MEDIA, ErrorRecord, Record


def _wav_truncation(path: Path) -> str | None:
    """For RIFF/RF64 WAV files: a reason string when the data chunk is cut short, else None."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return None  # not a WAV container: libsndfile decides
        pos = 12
        while pos + 8 <= size:
            fh.seek(pos)
            cid, csize = struct.unpack("<4sI", fh.read(8))
            if cid == b"data":
                if csize in (0, 0xFFFFFFFF) or head[:4] == b"RF64":
                    return None  # streamed / 64-bit size lives elsewhere: cannot check here
                if pos + 8 + csize > size:
                    return f"data chunk declares {csize} bytes, file has {size - pos - 8}"
                return None
            pos += 8 + csize + (csize & 1)  # chunks are word-aligned
        return "no data chunk before end of file"


def _readable(p: Path) -> None:
    """Raise MediaError unless the file opens for reading: 'missing file', or 'unreadable file' naming
    the OS reason (a symlink loop, permission denied) so one bad path is one error row."""
    try:
        with open(p, "rb"):
            pass
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise MediaError(p, "missing file") from None
    except OSError as e:
        raise MediaError(p, f"unreadable file: {e.strerror or type(e).__name__}") from None
    except ValueError as e:  # a NUL byte in the path
        raise MediaError(p, f"unreadable file: {e}") from None


def content_sha256(p: Path) -> str:
    """The file's content hash: normalize calls two files with equal hashes duplicates."""
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def probe_audio(path: str | Path, min_seconds: float = 0.0) -> dict:
    """Decode an audio file with libsndfile (any WAV incl. float, FLAC, OGG); raise MediaError."""
    import soundfile as sf

    p = Path(path)
    _readable(p)
    if not p.is_file():
        raise MediaError(p, "missing file")
    if p.stat().st_size == 0:
        raise MediaError(p, "undecodable audio: empty file")
    trunc = _wav_truncation(p)
    if trunc:
        raise MediaError(p, f"truncated audio: {trunc}")
    try:
        info = sf.info(str(p))
        wav, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports every decode failure as a generic error
        raise MediaError(p, f"undecodable audio: {e}") from e
    if wav.shape[1] < 1 or rate <= 0:
        raise MediaError(p, f"undecodable audio: {wav.shape[1]} channels at {rate} Hz")
    if not np.isfinite(wav).all():
        raise MediaError(p, "undecodable audio: non-finite samples")
    seconds = wav.shape[0] / rate
    if seconds < min_seconds:
        raise MediaError(p, f"too short: {seconds:.3f} s < {min_seconds} s")
    return {"seconds": round(seconds, 6), "sample_rate": int(rate), "channels": int(wav.shape[1]),
            "frames": int(wav.shape[0]), "format": info.format, "subtype": info.subtype,
            "bytes": p.stat().st_size, "sha256": content_sha256(p)}


def probe_image(path: str | Path) -> dict:
    """PIL verify (container integrity) then a full load (pixel data); raise MediaError."""
    from PIL import Image

    p = Path(path)
    _readable(p)
    if not p.is_file():
        raise MediaError(p, "missing file")
    try:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:  # verify() leaves the image unusable: reopen to decode pixels
            im.load()
            w, h, mode, fmt = im.width, im.height, im.mode, im.format
    except Exception as e:  # UnidentifiedImageError, truncated data, bad CRC ...
        raise MediaError(p, f"undecodable image: {type(e).__name__}: {e}") from e
    if w < 1 or h < 1:
        raise MediaError(p, f"undecodable image: size {w}x{h}")
    return {"width": int(w), "height": int(h), "mode": mode, "format": fmt, "bytes": p.stat().st_size,
            "sha256": content_sha256(p)}


def _category(reason: str) -> str:
    """'truncated audio: data chunk ...' -> 'truncated audio' (what summaries count)."""
    return reason.split(":", 1)[0].strip()


def probe_record(rec: Record, min_audio_seconds: float = 0.05) -> Union[Record, ErrorRecord]:
    """Probe every medium the record's task needs. Returns a copy with meta['probe'] or an error."""
    out = copy.deepcopy(rec)
    probes: dict = {}
    for modality in TASK_MEDIA.get(rec.task, ()):
        path = rec.media_path(modality)
        if not path:
            return ErrorRecord(id=rec.id, stage="probe", reason="missing modality", source=rec.source,
                               detail=f"{rec.id}: task {rec.task} needs {modality}.path")
        try:
            with media_file(path) as local:
                probes[modality] = (probe_audio(local, min_audio_seconds) if modality == "audio"
                                    else probe_image(local))
        except MediaError as e:
            return ErrorRecord(id=rec.id, stage="probe", reason=_category(e.reason), source=rec.source,
                               detail=f"{rec.id}: {e}")
        except OSError as e:  # the file went away or became unreadable mid-probe: this record's error
            return ErrorRecord(id=rec.id, stage="probe", reason="unreadable file", source=rec.source,
                               detail=f"{rec.id}: {path}: {e.strerror or type(e).__name__}")
        except Exception as e:  # anything else about this one record never stops the job
            return ErrorRecord(id=rec.id, stage="probe", reason="probe failed", source=rec.source,
                               detail=f"{rec.id}: {path}: {type(e).__name__}: {e}")
    out.meta["probe"] = probes
    return out
