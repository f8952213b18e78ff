"""A small synthetic dataset with learnable structure, in the real raw formats.

Images (LLaVA-Pretrain layout: `llava_pretrain/images/<id>.png` + `blip_laion_cc_sbu_558k.json`):
64x64 plain background with 1-4 same shapes of one colour, grouped on the left / right / top /
bottom / center. Caption e.g. "two red circles on the left"; the human prompt varies.

Audio (AudioCaps layout: `audiocaps/audio/<audiocap_id>.wav` + `train.csv`): 2.0 s, 24 kHz mono
16-bit PCM with 1-4 beeps of one pitch (low 330 Hz / medium 660 Hz / high 1320 Hz) and one length
(short 0.12 s / long 0.36 s), centred in the clip (+-20 ms). Caption e.g. "three short high beeps".

The caption is a function of the content and the content determines the caption (background,
exact offsets and noise are nuisance). Sample i depends only on (seed, i), so a larger dataset
extends a smaller one; same seed -> byte-identical files (no timestamps anywhere).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import write_file

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30)}
BACKGROUNDS = ((245, 245, 245), (40, 40, 40), (200, 200, 215), (235, 225, 200))
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top",
                  "bottom": "at the bottom", "center": "in the center"}
ANCHORS = {"left": (11, 32), "right": (53, 32), "top": (32, 11), "bottom": (32, 53), "center": (32, 32)}
COUNT_WORDS = ("one", "two", "three", "four")
SHAPE_SIZE, SPACING = 10, 14
PROMPTS = (
    "<image>\nDescribe the image concisely.",
    "<image>\nGive a brief description of the image.",
    "<image>\nWhat is shown in this picture?",
    "Summarize the visual content of the image.\n<image>",
    "<image>\nWrite a short caption for this image.",
    "Briefly describe what you see.\n<image>",
)

SAMPLE_RATE = 24000
CLIP_SECONDS = 2.0
PITCHES = {"low": 330.0, "medium": 660.0, "high": 1320.0}
LENGTHS = {"short": 0.12, "long": 0.36}
BEEP_GAP = 0.14
ONSET_JITTER = 0.02  # seconds either side of the centred onset


def _rng(seed: int, kind: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, kind, i])  # per-sample stream: independent of n


def draw_scene(rng: np.random.Generator) -> dict:
    """One synthetic image's content, drawn in this order from `rng`: make_image's arguments."""
    return dict(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                count=int(rng.integers(1, 5)), position=POSITIONS[rng.integers(len(POSITIONS))],
                background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
                jitter=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))))


def draw_beeps(rng: np.random.Generator) -> dict:
    """One synthetic clip's content, drawn in this order from `rng` before make_beeps draws the clip:
    {'count', 'length', 'pitch'}."""
    return dict(count=int(rng.integers(1, 5)), length=list(LENGTHS)[rng.integers(len(LENGTHS))],
                pitch=list(PITCHES)[rng.integers(len(PITCHES))])


def image_caption(shape: str, colour: str, count: int, position: str) -> str:
    noun = shape if count == 1 else shape + "s"
    return f"{COUNT_WORDS[count - 1]} {colour} {noun} {POSITION_WORDS[position]}"


def audio_caption(count: int, length: str, pitch: str) -> str:
    return f"{COUNT_WORDS[count - 1]} {length} {pitch} beep{'s' if count > 1 else ''}"


def _offsets(position: str, count: int) -> list[tuple[float, float]]:
    """Shape centres relative to the anchor: a column (left/right), a row (top/bottom), a cluster."""
    line = [(k - (count - 1) / 2) * SPACING for k in range(count)]
    if position in ("left", "right"):
        return [(0.0, d) for d in line]
    if position in ("top", "bottom"):
        return [(d, 0.0) for d in line]
    h = SPACING / 2
    return {1: [(0, 0)], 2: [(-h, 0), (h, 0)], 3: [(-h, -h), (h, -h), (0, h)],
            4: [(-h, -h), (h, -h), (-h, h), (h, h)]}[count]


def make_image(shape: str, colour: str, count: int, position: str, background: tuple, jitter: tuple):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(im)
    ax, ay = ANCHORS[position][0] + jitter[0], ANCHORS[position][1] + jitter[1]
    r = SHAPE_SIZE / 2
    for dx, dy in _offsets(position, count):
        cx, cy = ax + dx, ay + dy
        box = [round(cx - r), round(cy - r), round(cx + r) - 1, round(cy + r) - 1]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return im


def make_beeps(count: int, length: str, pitch: str, rng: np.random.Generator) -> np.ndarray:
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    beep = LENGTHS[length]
    total = count * beep + (count - 1) * BEEP_GAP
    # centred, with a small jitter like the images' +-2 px: a caption names no onset, so a random one
    # would make most of a clip's codes unpredictable from its caption (t2a targets must be learnable)
    start = (CLIP_SECONDS - total) / 2 + rng.uniform(-ONSET_JITTER, ONSET_JITTER)
    wav = rng.normal(0.0, 0.003, n)  # faint noise floor: the clip is never digital silence
    t = np.arange(int(beep * SAMPLE_RATE)) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)  # 10 ms ramps: no clicks
    tone = 0.5 * np.sin(2 * np.pi * PITCHES[pitch] * t) * fade
    for k in range(count):
        s = int((start + k * (beep + BEEP_GAP)) * SAMPLE_RATE)
        wav[s:s + len(tone)] += tone
    return np.clip(wav, -1.0, 1.0).astype(np.float32)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data)


def write_synth(out_dir: str | Path, n_images: int, n_audio: int, seed: int = 0) -> dict:
    """Write the synthetic LLaVA-Pretrain and AudioCaps folders under `out_dir`.

    Returns {"seed", "llava_pretrain_dir", "audiocaps_dir", "llava_pretrain": {"dir", "json", "n"},
    "audiocaps": {"dir", "csv", "n"}}.
    Point `lumo data normalize --source llava_pretrain|audiocaps --input <dir>` at those folders."""
    import soundfile as sf

    out = Path(out_dir)
    img_dir, aud_dir = out / "llava_pretrain", out / "audiocaps"
    entries = []
    for i in range(n_images):
        rng = _rng(seed, 0, i)
        a = draw_scene(rng)
        sid = f"synth{i:06d}"
        buf = io.BytesIO()
        make_image(**a).save(buf, format="PNG")
        _write_bytes(img_dir / "images" / f"{sid}.png", buf.getvalue())
        entries.append({"id": sid, "image": f"images/{sid}.png", "conversations": [
            {"from": "human", "value": PROMPTS[rng.integers(len(PROMPTS))]},
            {"from": "gpt", "value": image_caption(a["shape"], a["colour"], a["count"], a["position"])}]})
    if n_images:
        _write_bytes(img_dir / "blip_laion_cc_sbu_558k.json",
                     (json.dumps(entries, indent=1, ensure_ascii=False) + "\n").encode())

    rows = []
    for i in range(n_audio):
        rng = _rng(seed, 1, i)
        b = draw_beeps(rng)
        wav = make_beeps(**b, rng=rng)
        aid = str(900000 + i)
        buf = io.BytesIO()
        sf.write(buf, wav, SAMPLE_RATE, format="WAV", subtype="PCM_16")
        _write_bytes(aud_dir / "audio" / f"{aid}.wav", buf.getvalue())
        rows.append([aid, "", "0", audio_caption(**b)])
    if n_audio:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)
        _write_bytes(aud_dir / "train.csv", buf.getvalue().encode())

    return {"seed": seed, "llava_pretrain_dir": str(img_dir), "audiocaps_dir": str(aud_dir),
            "llava_pretrain": {"dir": str(img_dir), "json": str(img_dir / "blip_laion_cc_sbu_558k.json"), "n": n_images},
            "audiocaps": {"dir": str(aud_dir), "csv": str(aud_dir / "train.csv"), "n": n_audio}}


# The same draws in memory, for the tiny codecs' fits (trainers/codec_vq.py, codecs/audio_train.py) and the audit's
# floor checks (eval/audit.py): what write_synth would write, before PNG / 16-bit PCM encoding.

def synthetic_shape_images(n: int, seed: int, adapter: Any) -> list:
    """n images drawn as write_synth draws them (per-sample stream [seed, 0, i]: shape, colour, count,
    position, background, jitter; 64x64 pixels), prepared by the image adapter `adapter` (its prepare:
    bicubic resize to its resolution + center crop), each ImageInput's record naming what was drawn.
    Image i depends only on (seed, i)."""
    out = []
    for i in range(n):
        a = draw_scene(_rng(seed, 0, i))
        x = adapter.prepare(make_image(**a), f"synth:{seed}:{i}")
        x.record.update(shape=a["shape"], colour=a["colour"], count=a["count"], position=a["position"])
        out.append(x)
    return out


def synthetic_beeps(n: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """n clips drawn as write_synth draws its audio (per-sample stream [seed, 1, i]: count, length, pitch,
    then the clip; before its 16-bit PCM rounding): float32 [n, 48000] at 24 kHz and their {'count',
    'length', 'pitch'}. Clip i depends only on (seed, i)."""
    wavs, truths = [], []
    for i in range(n):
        rng = _rng(seed, 1, i)
        b = draw_beeps(rng)
        wavs.append(make_beeps(**b, rng=rng))
        truths.append(b)
    return np.stack(wavs) if wavs else np.zeros((0, int(SAMPLE_RATE * CLIP_SECONDS)), np.float32), truths
