"""Synthetic dataset: deterministic bytes, real raw formats, captions that match the content."""
from __future__ import annotations

import csv
import json
from collections import deque
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from lumo_ray.data.readers import read_source
from lumo_ray.data.synth import COLOURS, COUNT_WORDS, PITCHES, SAMPLE_RATE, write_synth

N_IMG, N_AUD = 40, 24


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    write_synth(tmp_path / "a", N_IMG, N_AUD, seed=3)
    write_synth(tmp_path / "b", N_IMG, N_AUD, seed=3)
    write_synth(tmp_path / "c", N_IMG, N_AUD, seed=4)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == N_IMG + N_AUD + 2 and a == b
    assert a.keys() == c.keys() and a != c
    # sample i depends only on (seed, i): a smaller dataset is a prefix of a larger one
    write_synth(tmp_path / "d", 5, 3, seed=3)
    d = _files(tmp_path / "d")
    assert all(d[k] == a[k] for k in d if k.endswith((".png", ".wav")))


def test_synth_is_in_the_raw_formats_and_readable(tmp_path):
    info = write_synth(tmp_path, N_IMG, N_AUD, seed=0)
    imgs, e1 = read_source("llava_pretrain", info["llava_pretrain"]["dir"])
    auds, e2 = read_source("audiocaps", info["audiocaps"]["dir"])
    assert (len(imgs), len(auds), e1, e2) == (N_IMG, N_AUD, [], [])
    assert len({r.text["prompt"] for r in imgs}) > 2 and all("<image>" in r.text["prompt"] for r in imgs)
    assert Path(info["llava_pretrain"]["json"]).name == "blip_laion_cc_sbu_558k.json"
    i = sf.info(auds[0].media_path("audio"))
    assert (i.samplerate, i.channels, i.subtype, i.duration) == (24000, 1, "PCM_16", 2.0)
    assert Image.open(imgs[0].media_path("image")).size == (64, 64)


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        comp, q = [], deque([(y, x)])
        seen[y, x] = True
        while q:
            cy, cx = q.popleft()
            comp.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        comps.append(comp)
    return comps


def _describe_image(path: str) -> str:
    """Recover the caption from the pixels alone."""
    px = np.asarray(Image.open(path).convert("RGB"))
    found = [(name, np.all(px == rgb, axis=-1)) for name, rgb in COLOURS.items()]
    colour, mask = max(found, key=lambda t: t[1].sum())
    comps = _components(mask)
    fills = []
    for c in comps:
        ys, xs = np.array(c).T
        fills.append(len(c) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    fill = float(np.mean(fills))
    shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    pos = ("on the left" if cx < 22 else "on the right" if cx > 42 else
           "at the top" if cy < 22 else "at the bottom" if cy > 42 else "in the center")
    n = len(comps)
    return f"{COUNT_WORDS[n - 1]} {colour} {shape if n == 1 else shape + 's'} {pos}"


def _describe_audio(path: str) -> str:
    """Recover the caption from the samples alone: envelope segments and the dominant frequency."""
    wav, rate = sf.read(path, dtype="float32")
    hop = rate // 200  # 5 ms frames
    env = np.sqrt(np.mean(wav[: len(wav) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    on = np.concatenate([[False], env > 0.1, [False]])
    starts, ends = np.nonzero(~on[:-1] & on[1:])[0], np.nonzero(on[:-1] & ~on[1:])[0]
    seconds = float(np.mean(ends - starts)) * hop / rate
    length = "short" if seconds < 0.24 else "long"
    spec = np.abs(np.fft.rfft(wav))
    freq = np.fft.rfftfreq(len(wav), 1 / rate)[spec.argmax()]
    pitch = min(PITCHES, key=lambda k: abs(np.log(PITCHES[k] / freq)))
    n = len(starts)
    return f"{COUNT_WORDS[n - 1]} {length} {pitch} beep{'s' if n > 1 else ''}"


def test_captions_agree_with_content(tmp_path):
    info = write_synth(tmp_path, N_IMG, N_AUD, seed=1)
    entries = json.loads(Path(info["llava_pretrain"]["json"]).read_text())
    root = Path(info["llava_pretrain"]["dir"])
    for e in entries:
        assert _describe_image(str(root / e["image"])) == e["conversations"][1]["value"], e["id"]
    rows = list(csv.DictReader(open(info["audiocaps"]["csv"])))
    adir = Path(info["audiocaps"]["dir"]) / "audio"
    for r in rows:
        assert _describe_audio(str(adir / f"{r['audiocap_id']}.wav")) == r["caption"], r
    # the attributes really vary (a constant caption would also "agree")
    caps = [e["conversations"][1]["value"] for e in entries]
    assert len(set(caps)) > N_IMG // 2 and len({r["caption"] for r in rows}) > 6
    assert {c.split()[0] for c in caps} == set(COUNT_WORDS) and SAMPLE_RATE == 24000
