"""VQ-GAN image adapter on `diffusers.VQModel` (SPEC §4, image kind 'vq').

Deterministic encode (nearest codebook entry per latent cell, row-major grid order) and a
deterministic pixel decoder, so reconstruction PSNR/SSIM are real numbers. Presets are built from
configs with random weights (no network): 'tiny' (f4, codebook 256, fast on CPU) and 'full' (the
taming-transformers VQ-GAN f16 / 16384 architecture, for benchmarks). Anything else is loaded
with VQModel.from_pretrained (a local directory, or a hub id already in the local cache).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ImageConfig, RuntimeConfig
from .base import IMAGE_VQ_PRESETS, ImageInput, MediaError, image_model_identity

# diffusers VQModel kwargs. Downsampling factor = 2 ** (len(block_out_channels) - 1).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, vq_embed_dim=4,
                 norm_num_groups=8, num_vq_embeddings=256),
    # taming-transformers VQ-GAN f16-16384: ch=128, ch_mult=(1,1,2,2,4), 2 res blocks, z=embed=256
    "full": dict(block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=256,
                 vq_embed_dim=256, norm_num_groups=32, num_vq_embeddings=16384),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_vq_adapter(cfg: ImageConfig, runtime: RuntimeConfig) -> "VQImageAdapter":
    """Build the configured VQ image adapter (presets are random-init and need no network)."""
    if cfg.kind != "vq":
        raise ValueError(f"image.kind={cfg.kind!r}: build_vq_adapter only builds kind 'vq'")
    if cfg.model in IMAGE_VQ_PRESETS:
        model = _build_preset(cfg.model, cfg.seed, cfg.codebook_size, cfg.resolution)
    else:
        model = _load_pretrained(cfg.model)
        n = model.config.num_vq_embeddings
        if cfg.codebook_size is not None and cfg.codebook_size != n:
            raise ValueError(f"image.codebook_size={cfg.codebook_size} but {cfg.model!r} has a codebook of {n}")
    return VQImageAdapter(model, cfg, runtime)


def _build_preset(name: str, seed: int, codebook_size: int | None, resolution: int) -> Any:
    from diffusers import VQModel

    kw = dict(PRESET_CONFIGS[name])
    if codebook_size is not None:
        kw["num_vq_embeddings"] = codebook_size
    down = len(kw["block_out_channels"])
    # fork_rng: a deterministic build without disturbing the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * down,
                        up_block_types=("UpDecoderBlock2D",) * down, sample_size=resolution, **kw)
    _init_codebook(model, seed)
    return model.eval()


@torch.no_grad()
def _init_codebook(model: Any, seed: int) -> None:
    """diffusers initialises the codebook to U(-1/n, 1/n): far smaller than the encoder's latents,
    so nearly every cell would pick the same few codes. Draw a Gaussian codebook matched to the
    per-channel latent mean/std measured on seeded noise images, so random presets give
    spread-out, content-dependent codes like a trained tokenizer does."""
    g = torch.Generator().manual_seed(seed)
    f = _factor(model)
    side = max(4 * f, min(64, 8 * f))
    x = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    model.eval()
    z = model.quant_conv(model.encoder(x))  # [2, D, h, w]
    z = z.permute(1, 0, 2, 3).reshape(z.shape[1], -1)
    mean, std = z.mean(1), z.std(1).clamp_min(1e-6)
    emb = model.quantize.embedding.weight
    emb.copy_(mean + std * torch.randn(emb.shape, generator=g))


def _factor(model: Any) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


def _load_pretrained(ref: str) -> Any:
    from diffusers import VQModel

    p = Path(ref)
    # Latent-diffusion style repos keep the VQ-GAN in a 'vqvae' subfolder
    sub = "vqvae" if p.is_dir() and not (p / "config.json").exists() and (p / "vqvae" / "config.json").exists() else None
    try:
        model = VQModel.from_pretrained(ref, subfolder=sub) if sub else VQModel.from_pretrained(ref)
    except Exception as e:  # noqa: BLE001 - re-raised with the reference and the way out
        raise ValueError(
            f"image.model={ref!r}: cannot load VQModel weights ({type(e).__name__}: {e}). Use a preset "
            f"({', '.join(IMAGE_VQ_PRESETS)}) or a local diffusers VQModel directory / cached hub id.") from e
    return model.eval()


class VQImageAdapter:
    """ImageAdapter (lumo_ray.codecs.base) over a diffusers VQModel."""

    deterministic_decode = True

    def __init__(self, model: Any, cfg: ImageConfig, runtime: RuntimeConfig):
        self.cfg = cfg
        self.device = torch.device(runtime.device)
        self.dtype = _DTYPES[runtime.dtype]
        model = model.to(self.device)
        if self.dtype != model.dtype:  # (a float32 .to(dtype) would only trigger a diffusers warning)
            model = model.to(self.dtype)
        self.model = model.eval()
        self.factor = _factor(model)
        if cfg.resolution <= 0 or cfg.resolution % self.factor:
            raise ValueError(f"image.resolution={cfg.resolution} must be a positive multiple of the VQ "
                             f"downsampling factor {self.factor}")
        self.image_size = cfg.resolution
        self.grid = cfg.resolution // self.factor
        self.tokens_per_image = self.grid * self.grid
        self.codebook_size = int(model.config.num_vq_embeddings)
        self.embed_dim = int(model.quantize.embedding.weight.shape[1])

    def identity(self) -> dict:
        return {"kind": "vq", "model": image_model_identity(self.cfg),
                "codebook_size": self.codebook_size, "tokens_per_image": self.tokens_per_image,
                "resolution": self.image_size}

    # -- preprocessing ---------------------------------------------------------------------------

    def load(self, path: str) -> ImageInput:
        from PIL import Image, UnidentifiedImageError

        p = Path(path)
        if not p.is_file():
            raise MediaError(path, "file not found" if not p.exists() else "not a regular file")
        if os.path.getsize(p) == 0:
            raise MediaError(path, "empty file (0 bytes)")
        try:
            with Image.open(p) as im:
                im.load()  # decode now: truncated / corrupt data fails here, not later
                return self.prepare(im, str(path))
        except UnidentifiedImageError:
            raise MediaError(path, "not an image (PIL cannot identify the format)") from None
        except MediaError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise MediaError(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None

    def prepare(self, image: Any, name: str = "<image>") -> ImageInput:
        """PIL image -> RGB, shorter side resized to the resolution (bicubic), center crop,
        float32 [3, H, W] in [0, 1], with a record of what was done."""
        from PIL import Image, ImageOps

        w, h = image.size
        if w <= 0 or h <= 0:
            raise MediaError(name, f"zero-size image ({w}x{h})")
        mode = image.mode
        # camera photos store their rotation in the EXIF orientation tag (0x0112)
        exif_rotated = image.getexif().get(0x0112, 1) not in (0, 1)
        rgb = ImageOps.exif_transpose(image) if exif_rotated else image
        rgb = rgb.convert("RGB")
        r = self.image_size
        ow, oh = rgb.size
        s = r / min(ow, oh)
        nw, nh = max(r, round(ow * s)), max(r, round(oh * s))
        rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - r) // 2, (nh - r) // 2
        box = (left, top, left + r, top + r)
        rgb = rgb.crop(box)
        pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        record = {"orig_size": [w, h], "mode": mode, "exif_rotated": bool(exif_rotated),
                  "resized_to": [nw, nh], "crop_box": list(box), "size": [r, r]}
        return ImageInput(pixels=np.ascontiguousarray(pixels), record=record)

    # -- codes -----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_batch(self, images: list[ImageInput]) -> list[np.ndarray]:
        """Nearest-code ids per latent cell, int64 [tokens_per_image] in row-major grid order."""
        if not images:
            return []
        r = self.image_size
        for i, im in enumerate(images):
            if im.pixels.shape != (3, r, r):
                raise ValueError(f"image {i}: pixels have shape {im.pixels.shape}, expected (3, {r}, {r}); "
                                 f"use load()/prepare() of this adapter")
        x = torch.from_numpy(np.stack([im.pixels for im in images])).to(self.device, self.dtype) * 2 - 1
        z = self.model.encode(x).latents  # [B, D, g, g]
        z = z.permute(0, 2, 3, 1).reshape(len(images), -1, z.shape[1]).double()
        codes = self._nearest(z)
        return [c.astype(np.int64) for c in codes.cpu().numpy()]

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        # float64 squared distances, one image at a time: a code never depends on batch composition
        e = self.model.quantize.embedding.weight.to(z.device, torch.float64)
        e2 = (e * e).sum(1)
        out = []
        for zi in z:  # [N, D]
            d = e2[None, :] - 2.0 * (zi @ e.T)  # |z|^2 is constant per row and does not change argmin
            out.append(d.argmin(1))
        return torch.stack(out)

    @torch.no_grad()
    def decode(self, codes: np.ndarray, seed: int = 0) -> np.ndarray:
        """Codes -> uint8 [H, W, 3]. Deterministic: `seed` is accepted for the interface and unused."""
        c = np.asarray(codes)
        if c.shape != (self.tokens_per_image,):
            raise ValueError(f"codes have shape {c.shape}, expected ({self.tokens_per_image},)")
        if c.size and (c.min() < 0 or c.max() >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size}): min {c.min()}, max {c.max()}")
        idx = torch.from_numpy(c.astype(np.int64)).to(self.device)
        quant = self.model.quantize.get_codebook_entry(idx, (1, self.grid, self.grid, self.embed_dim))
        img = self.model.decode(quant.to(self.dtype), force_not_quantize=True).sample[0]
        img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(1, 2, 0).cpu().numpy()
