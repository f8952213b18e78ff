"""What the tiny CLIP preset (`data.embed.model: tiny`) trains on and is measured by, plain PyTorch (no
Ray); its training loop is trainers/codec_clip.py's workload on the one loop.

A random CLIP does not embed by content: the preset's random init puts nearly every pair of images
at cosine > 0.95 (another random init kept shifted copies apart instead), so `lumo data dedup` could
not tell copies from distinct images. The preset is therefore trained, from its seeded init, on two
contrastive terms over procedurally drawn images:

- image-image (InfoNCE between two edited copies of each image): synthetic shape scenes, random colour
  grids and procedural scenes, each copy downscaled, JPEG re-encoded and/or shifted by a few pixels as
  near-duplicates are; the copies must embed closer to each other than to any other image, including
  the same scenes drawn in another shape (hard negatives); plus a 1 - cosine term between the copies;
- image-text (CLIP's symmetric loss): the synthetic shape scenes against their captions
  (lumo_ray.data.synth), images whose captions are equal being positives of each other, so the
  caption-image agreement score means something on the synthetic data.

One thread, per-step seeded draws: the same arguments give byte-identical weights.
`lumo codec train-clip` (trainers/codec_clip.py) writes the preset's weights (codecs/assets/clip_tiny).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..integrity import write_manifest
from ..storage import write_file
from ..codecs.clip import WEIGHTS


def _draw_scene(a: dict) -> tuple[Image.Image, str]:
    from ..data import synth

    return synth.make_image(**a), synth.image_caption(a["shape"], a["colour"], a["count"], a["position"])


def _synth_scene(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A synthetic shape scene drawn as lumo_ray.data.synth draws them, and its caption."""
    from ..data.synth import draw_scene

    return _draw_scene(draw_scene(rng))


def _sibling(a: dict, rng: np.random.Generator) -> dict:
    """The same scene with another shape: at 32 px a few pixels apart, a distinct image all the same."""
    from ..data import synth

    return dict(a, shape=[x for x in synth.SHAPES if x != a["shape"]][rng.integers(len(synth.SHAPES) - 1)])


def _grid(rng: np.random.Generator) -> Image.Image:
    g, side = int(rng.integers(2, 9)), int(rng.integers(48, 129))
    cells = rng.integers(0, 256, (g, g, 3)).astype(np.uint8)
    return Image.fromarray(cells).resize((side, side), Image.NEAREST)


def _scene(rng: np.random.Generator) -> Image.Image:
    from ..codecs.image_vq import procedural_images

    side = int(rng.integers(48, 129))
    x = procedural_images(1, side, int(rng.integers(2**31)))[0]
    return Image.fromarray((np.transpose(x, (1, 2, 0)) * 255).round().astype(np.uint8))


def shift(im: Image.Image, dx: int, dy: int) -> Image.Image:
    """`im` moved by (dx, dy) pixels, the uncovered border repeating the edge."""
    a = np.asarray(im.convert("RGB"))
    h, w = a.shape[:2]
    p = max(abs(dx), abs(dy))
    a = np.pad(a, ((p, p), (p, p), (0, 0)), mode="edge")
    return Image.fromarray(np.ascontiguousarray(a[p - dy:p - dy + h, p - dx:p - dx + w]))


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    b = io.BytesIO()
    im.convert("RGB").save(b, "JPEG", quality=quality)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB")


def near_copy(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a near-duplicate looks like: downscale (50-100 %), a shift of up to 3 % of the side and a
    JPEG re-encode (quality 40-95), each applied with probability 0.5, 0.7 and 0.5."""
    w, h = im.size
    if rng.random() < 0.5:
        s = rng.uniform(0.5, 1.0)
        im = im.resize((max(8, round(w * s)), max(8, round(h * s))), Image.BICUBIC)
    if rng.random() < 0.7:
        m = max(1, round(0.03 * min(im.size)))
        im = shift(im, int(rng.integers(-m, m + 1)), int(rng.integers(-m, m + 1)))
    if rng.random() < 0.5:
        im = jpeg(im, int(rng.integers(40, 96)))
    return im


def draws(clip, step: int, seed: int, n: int):
    """Step `step`'s draws: n images (half synthetic scenes with captions, the second quarter being the
    first quarter's shape siblings: hard negatives; a quarter grids, a quarter procedural scenes), two
    near copies of each as pixels, and the scenes' captions."""
    from ..data.synth import draw_scene

    rng = np.random.default_rng([seed, 7, step])
    ims, caps, attrs = [], [], []
    for j in range(n):
        if j < n // 2:
            attrs.append(draw_scene(rng) if j < n // 4 else _sibling(attrs[j - n // 4], rng))
            im, cap = _draw_scene(attrs[-1])
            caps.append(cap)
        else:
            im = _grid(rng) if j < 3 * n // 4 else _scene(rng)
        ims.append(im)
    v1 = np.stack([clip.pixels(near_copy(im, rng)) for im in ims])
    v2 = np.stack([clip.pixels(near_copy(im, rng)) for im in ims])
    return torch.from_numpy(v1), torch.from_numpy(v2), caps


def image_image_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    logits = z1 @ z2.T / tau
    y = torch.arange(len(z1))
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def image_text_loss(zi: torch.Tensor, zt: torch.Tensor, caps: list[str], tau: float) -> torch.Tensor:
    same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    logits = zi @ zt.T / tau
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def save_preset(clip, out_dir: str | Path, meta: dict) -> dict:
    """The weights (codecs.image_vq.save_weights: bytes a function of the weights) and meta.json."""
    from ..codecs.image_vq import save_weights

    out = Path(out_dir)
    sha = save_weights(clip.model, out / WEIGHTS)
    meta = dict(meta, weights_sha256=sha, bytes=(out / WEIGHTS).stat().st_size)
    write_file(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    write_manifest(out)  # the preset's digests, verified when it loads (lumo_ray/integrity.py)
    return meta


def near_duplicate_eval(clip, n: int = 200, copies: int = 40, seed: int = 1000, threshold: float = 0.95) -> dict:
    """Held-out images (seed stream `seed`, never drawn in training): n distinct images (synthetic
    scenes, grids, procedural scenes in turn) and, of the first `copies`, a 75 % resize, a JPEG
    re-encode (quality 75) and a 2 % shift. Recall: copies whose cosine to their source is >= threshold;
    precision: found copies over found copies plus pairs of the distinct images that close (at 32 px a
    few distinct images are near-identical: a flat background with and without a 4-px shape).
    shape_siblings_above: of `copies` scenes and the same scene with another shape, the fraction that
    close (the hardest distinct pairs of the synthetic data)."""
    rng = np.random.default_rng([seed, 9])
    ims = [(_synth_scene(rng)[0], _grid(rng), _scene(rng))[i % 3] for i in range(n)]
    edits = {"resize": lambda im: im.resize((round(im.width * 0.75), round(im.height * 0.75)), Image.BICUBIC),
             "jpeg": lambda im: jpeg(im, 75),
             "shift": lambda im: shift(im, max(1, round(0.02 * im.width)), max(1, round(0.02 * im.height)))}
    z = clip.embed_images([clip.pixels(im) for im in ims])
    sim = z @ z.T
    np.fill_diagonal(sim, -1)
    out = {"n": n, "copies": copies, "threshold": threshold,
           "distinct_pairs_above": int((np.triu(sim, 1) >= threshold).sum()),
           "distinct_max_cosine": round(float(sim.max()), 4)}
    found = 0
    for name, edit in edits.items():
        zc = clip.embed_images([clip.pixels(edit(im)) for im in ims[:copies]])
        cos = (zc * z[:copies]).sum(1)
        found += int((cos >= threshold).sum())
        out[f"{name}_recall"] = round(float((cos >= threshold).mean()), 4)
        out[f"{name}_min_cosine"] = round(float(cos.min()), 4)
    out["precision"] = round(found / max(1, found + out["distinct_pairs_above"]), 4)
    from ..data.synth import draw_scene

    a = [draw_scene(rng) for _ in range(copies)]
    za = clip.embed_images([clip.pixels(_draw_scene(x)[0]) for x in a])
    zb = clip.embed_images([clip.pixels(_draw_scene(_sibling(x, rng))[0]) for x in a])
    out["shape_siblings_above"] = round(float(((za * zb).sum(1) >= threshold).mean()), 4)
    return out
