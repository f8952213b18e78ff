"""SEED-2 image adapter (`image.kind: seed`): 32 causal Q-Former codes from an 8192-entry codebook
per image, decoded through the unCLIP Stable Diffusion 2.1 pipeline (docs/stage3_uti.md).

There is no deterministic pixel decoder: `decode(codes, seed)` runs the diffusion sampler, repeatable
for a seed and different across seeds. `embed(codes)` is the deterministic part (codes -> the
conditioning embedding the pipeline consumes). Weights come only from local paths in
`image.seed_weights` ('quantizer', 'eva_clip', 'unclip'); 'tiny' is a random-init preset of the same
architecture. See docs/seed_tokenizer.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import ImageConfig, RuntimeConfig
from .base import ImageInput, MediaError, image_model_identity, state_digest
from .seed import CLIP_MEAN, CLIP_STD, REAL, SeedArch, SeedQuantizer, load_seed_weights, tiny_arch
from .seed import unclip as unclip_mod

WEIGHT_KEYS = ("quantizer", "eva_clip", "unclip")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preprocess(image: Any, resolution: int, name: str) -> ImageInput:
    """PIL image -> RGB, shorter side resized to `resolution` (bicubic), center crop; [3,S,S] in [0,1].
    CLIP mean/std normalization is applied at encode time so ImageInput stays comparable to decodes."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise MediaError(name, f"expected a PIL image, got {type(image).__name__}")
    w, h = image.size
    if w < 1 or h < 1:
        raise MediaError(name, f"empty image ({w}x{h})")
    mode = image.mode
    try:
        rgb = image.convert("RGB")
    except Exception as e:  # broken palette / truncated data surfaces here
        raise MediaError(name, f"cannot convert mode {mode} to RGB: {e}") from e
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    rgb = rgb.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    pixels = np.asarray(rgb.crop(box), dtype=np.float32).transpose(2, 0, 1) / 255.0
    record = {"orig_size": [w, h], "mode": mode, "resized_to": [nw, nh], "crop_box": list(box),
              "size": resolution, "normalize": "clip_mean_std_at_encode"}
    return ImageInput(pixels=np.ascontiguousarray(pixels), record=record)


def load_image(path: str, resolution: int) -> ImageInput:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise MediaError(p, "file not found")
    if not p.is_file():
        raise MediaError(p, "not a regular file")
    try:
        with Image.open(p) as im:
            im.load()
            return preprocess(im, resolution, str(p))
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(p, f"cannot decode image: {e}") from e


class SeedImageAdapter:
    """The ImageAdapter protocol (lumo_ray.codecs.base) for SEED-2."""

    deterministic_decode = False

    def __init__(self, cfg: ImageConfig, runtime: RuntimeConfig, *, arch: SeedArch,
                 weights: Optional[dict[str, str]] = None):
        self.cfg = cfg
        self.arch = arch
        self.device = torch.device(runtime.device)
        self.dtype = _DTYPES[runtime.dtype]
        self.batch_size = max(1, int(runtime.batch_size))
        if cfg.resolution != arch.image_size:
            raise ValueError(f"image.resolution {cfg.resolution} != SEED encoder input size {arch.image_size}")
        self.random_init = weights is None
        if weights is None:  # offline preset: random init from the seed, same modules as the real one
            with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
                torch.manual_seed(cfg.seed)
                self.model = SeedQuantizer(arch)
                self.model.init_random()
                self.pipe = unclip_mod.tiny_unclip(arch.image_embed_dim, arch.image_size, cfg.seed + 1, self.dtype)
            self.ignored_keys: dict[str, list[str]] = {}
        else:
            with torch.device("meta"):  # no 1B-parameter random init just to overwrite it
                self.model = SeedQuantizer(arch)
            self.model.to_empty(device="cpu")
            self.ignored_keys = load_seed_weights(self.model, weights["quantizer"], weights["eva_clip"])
            self.pipe = unclip_mod.load_unclip(weights["unclip"], self.dtype)
        unclip_mod.check_compatible(self.pipe, arch.image_embed_dim, "seed_weights.unclip" if weights else "tiny")
        self.model.eval().to(self.device, self.dtype)
        self.pipe.to(self.device)
        self.codebook_size = arch.codebook_size
        self.tokens_per_image = arch.num_query_tokens
        self.image_size = unclip_mod.output_size(self.pipe)
        self._mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    # -- identity ---------------------------------------------------------------------------
    def identity(self) -> dict:
        model = image_model_identity(self.cfg)
        if self.random_init:  # the offline preset: named by its encoder's weights
            model = f"{self.cfg.model}@{state_digest(self.model)}"
        return {"kind": "seed", "model": model,
                "codebook_size": self.codebook_size, "tokens_per_image": self.tokens_per_image,
                "resolution": self.cfg.resolution}

    # -- input ------------------------------------------------------------------------------
    def load(self, path: str) -> ImageInput:
        return load_image(path, self.cfg.resolution)

    def prepare(self, image: Any, name: str = "<image>") -> ImageInput:
        return preprocess(image, self.cfg.resolution, name)

    # -- encode -----------------------------------------------------------------------------
    def _pixels(self, images: list[ImageInput]) -> torch.Tensor:
        s = self.cfg.resolution
        for i, im in enumerate(images):
            shape = tuple(np.shape(im.pixels))
            if shape != (3, s, s):
                raise ValueError(f"image {i} of the batch has shape {shape}, expected (3, {s}, {s}); "
                                 "use load()/prepare() first")
        x = torch.from_numpy(np.stack([np.asarray(im.pixels, dtype=np.float32) for im in images]))
        return ((x - self._mean) / self._std).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_batch(self, images: list[ImageInput]) -> list[np.ndarray]:
        """Preprocessed images -> one int64 [32] array of codes in [0, 8192) each."""
        out: list[np.ndarray] = []
        for i in range(0, len(images), self.batch_size):
            codes = self.model.get_codebook_indices(self._pixels(images[i:i + self.batch_size]))
            out.extend(c for c in codes.cpu().numpy().astype(np.int64))
        return out

    # -- decode -----------------------------------------------------------------------------
    def _codes(self, codes: np.ndarray) -> torch.Tensor:
        c = np.asarray(codes)
        if c.shape != (self.tokens_per_image,) or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"SEED codes must be an integer array of shape ({self.tokens_per_image},), "
                             f"got {c.dtype} {list(c.shape)}")
        if c.min() < 0 or c.max() >= self.codebook_size:
            raise ValueError(f"SEED code out of [0, {self.codebook_size}): min {c.min()} max {c.max()}")
        return torch.from_numpy(c.astype(np.int64))[None].to(self.device)

    @torch.no_grad()
    def embed(self, codes: np.ndarray) -> np.ndarray:
        """Codes -> the unCLIP conditioning embedding (deterministic), float32 [image_embed_dim]."""
        return self.model.get_codebook_entry(self._codes(codes)).float().cpu().numpy()[0]

    @torch.no_grad()
    def decode(self, codes: np.ndarray, seed: int = 0) -> np.ndarray:
        """Codes -> uint8 [H, W, 3] through the unCLIP pipeline; stochastic, repeatable for a seed."""
        embeds = self.model.get_codebook_entry(self._codes(codes))
        return unclip_mod.decode_embedding(self.pipe, embeds, seed, self.arch.decode_steps,
                                           self.arch.guidance_scale, self.image_size)[0]


def _weights(cfg: ImageConfig) -> dict[str, str]:
    w = dict(cfg.seed_weights or {})
    unknown = sorted(set(w) - set(WEIGHT_KEYS))
    missing = [k for k in WEIGHT_KEYS if not w.get(k)]
    if unknown or missing:
        raise ValueError(f"image.seed_weights needs local paths for {list(WEIGHT_KEYS)}; "
                         f"missing {missing}, unknown {unknown}")
    for k in WEIGHT_KEYS:
        if not Path(w[k]).exists():
            raise FileNotFoundError(f"image.seed_weights.{k}: {w[k]} does not exist")
    return w


def build_seed_adapter(cfg: ImageConfig, runtime: RuntimeConfig, *,
                       arch: Optional[SeedArch] = None) -> SeedImageAdapter:
    """'tiny': random-init preset at cfg.resolution (multiple of 8). 'real': published sizes with
    weights from cfg.seed_weights, cfg.resolution must be 224. `arch` overrides the architecture of
    'real' (used to check the loading path with small checkpoints)."""
    if cfg.kind != "seed":
        raise ValueError(f"build_seed_adapter needs image.kind 'seed', got {cfg.kind!r}")
    if cfg.model == "tiny":
        if cfg.resolution % 8:
            raise ValueError(f"image.resolution {cfg.resolution}: the tiny SEED preset needs a multiple of 8")
        return SeedImageAdapter(cfg, runtime, arch=arch or tiny_arch(cfg.resolution))
    if cfg.model == "real":
        return SeedImageAdapter(cfg, runtime, arch=arch or REAL, weights=_weights(cfg))
    raise ValueError(f"image.model {cfg.model!r} for kind 'seed': use 'tiny' or 'real' "
                     "(with image.seed_weights: quantizer, eva_clip, unclip)")
