"""VQ-GAN image adapter on `diffusers.VQModel` (docs/stage3_uti.md, image kind 'vq').

Deterministic encode (nearest codebook entry per latent cell, row-major grid order) and a
deterministic pixel decoder, so reconstruction PSNR/SSIM are real numbers. Presets are built from
configs (no network): 'tiny' (f4, codebook 256, fast on CPU) and 'full' (the taming-transformers
VQ-GAN f16 / 16384 architecture, random weights, for benchmarks). Anything else is loaded with
VQModel.from_pretrained (a local directory, or a hub id already in the local cache).

The tiny preset (seed 0, codebook 256) loads TRAINED weights shipped in the package
(codecs/assets/vq_tiny/model.safetensors, made by `lumo codec train-vq`, trainers/codec_vq.py;
its identity is their sha256). Other seeds / codebook sizes build the untrained data-dependent init
that training starts from (`_fit_tiny`: local, colour-faithful codes, but a random decoder).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ImageConfig, RuntimeConfig
from ..integrity import PRESET_TODO, verify_once
from ..runtime import torch_threads
from . import base
from .base import (IMAGE_VQ_PRESETS, ImageInput, MediaError, assign_weights, image_model_identity,
                   state_digest, uses_tiny_vq_weights)

# diffusers VQModel kwargs. Downsampling factor = 2 ** (len(block_out_channels) - 1).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    # 241k parameters (0.97 MB in float32): encoder features of 16 channels, projected (PCA init) to
    # 8-d codebook vectors; no mid-block attention (global mixing would make every cell depend on the
    # whole image)
    "tiny": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16, vq_embed_dim=8,
                 norm_num_groups=8, num_vq_embeddings=256, mid_block_add_attention=False),
    # taming-transformers VQ-GAN f16-16384: ch=128, ch_mult=(1,1,2,2,4), 2 res blocks, z=embed=256
    "full": dict(block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=256,
                 vq_embed_dim=256, norm_num_groups=32, num_vq_embeddings=16384),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Data-dependent init of the tiny preset (see _fit_tiny)
FIT_CELLS = 16384         # latent cells k-means runs on (a seeded subsample when there are more)
FIT_IMAGES = (32, 256)    # generic procedural images fitted on: enough for 2 x FIT_CELLS cells, within these bounds
KMEANS_ITERS = 20         # fixed Lloyd iterations: the result never depends on a tolerance test
_FITTED: dict[tuple, dict] = {}  # (preset, seed, codebook, resolution) or weights digest -> state_dict: one per process


def build_vq_adapter(cfg: ImageConfig, runtime: RuntimeConfig) -> "VQImageAdapter":
    """The configured VQ image adapter. Its sizes come from the model config; the weights are built
    (presets: random-init, no network) or loaded on first use, so a process that only needs the
    token space (a tokenize driver, a loader actor) never pays for them."""
    if cfg.kind != "vq":
        raise ValueError(f"image.kind={cfg.kind!r}: build_vq_adapter only builds kind 'vq'")
    conf = _model_config(cfg.model, cfg.codebook_size)
    if cfg.model not in IMAGE_VQ_PRESETS:
        n = conf.get("num_vq_embeddings", 256)
        if cfg.codebook_size is not None and cfg.codebook_size != n:
            raise ValueError(f"image.codebook_size={cfg.codebook_size} but {cfg.model!r} has a codebook of {n}")
    return VQImageAdapter(conf, cfg, runtime)


def _model_config(ref: str, codebook_size: int | None) -> dict[str, Any]:
    """VQModel config kwargs without building it: a preset's (with the codebook override), or the
    config.json of a local directory / cached hub id."""
    if ref in IMAGE_VQ_PRESETS:
        kw = dict(PRESET_CONFIGS[ref])
        if codebook_size is not None:
            kw["num_vq_embeddings"] = codebook_size
        return kw
    from diffusers import VQModel

    try:
        return dict(VQModel.load_config(ref, subfolder=_subfolder(ref)))
    except Exception as e:  # noqa: BLE001 - re-raised with the reference and the way out
        raise ValueError(
            f"image.model={ref!r}: cannot read a VQModel config ({type(e).__name__}: {e}). Use a preset "
            f"({', '.join(IMAGE_VQ_PRESETS)}) or a local diffusers VQModel directory / cached hub id.") from e


def _subfolder(ref: str) -> str | None:
    # Latent-diffusion style repos keep the VQ-GAN in a 'vqvae' subfolder
    p = Path(ref)
    return "vqvae" if p.is_dir() and not (p / "config.json").exists() and (p / "vqvae" / "config.json").exists() else None


def _build_preset(name: str, seed: int, codebook_size: int | None, resolution: int, trained: bool = False) -> Any:
    """A preset VQModel: the tiny preset's shipped trained weights (trained=True), the tiny
    preset's data-dependent init, or 'full' with a statistics-matched random codebook."""
    # fork_rng: a deterministic build without disturbing the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _preset_model(name, codebook_size, resolution)
    model.eval()
    if name == "tiny" and trained:
        verify_once(base.TINY_VQ_WEIGHTS.parent, "shipped VQ preset", PRESET_TODO)
        load_weights(model, base.TINY_VQ_WEIGHTS)
    elif name == "tiny":
        key = (name, seed, codebook_size or PRESET_CONFIGS[name]["num_vq_embeddings"], resolution)
        if key not in _FITTED:
            # one thread: the fit's float sums (and so the codebook) never depend on the caller's thread count
            with torch_threads(1):
                _fit_tiny(model, seed, resolution)
            _FITTED[key] = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(_FITTED[key])
    else:
        _init_codebook(model, seed)
    return model


def _preset_model(name: str, codebook_size: int | None, resolution: int) -> Any:
    """A preset's VQModel architecture, initialised as diffusers does (under the caller's RNG / device)."""
    from diffusers import VQModel

    kw = dict(PRESET_CONFIGS[name])
    if codebook_size is not None:
        kw["num_vq_embeddings"] = codebook_size
    down = len(kw["block_out_channels"])
    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * down,
                   up_block_types=("UpDecoderBlock2D",) * down, sample_size=resolution, **kw)


def _from_weights(name: str, codebook_size: int | None, resolution: int, weights: dict) -> Any:
    """A preset VQModel holding weights built in another process (VQImageAdapter.built_weights): the
    architecture on the meta device, then those tensors assigned (no init draws, no codebook fit)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = _preset_model(name, codebook_size, resolution)
    return assign_weights(model, weights)


def tiny_init(seed: int, codebook_size: int | None = None, resolution: int = 32) -> Any:
    """The tiny preset's untrained data-dependent init (the starting point of `lumo codec train-vq`)."""
    return _build_preset("tiny", seed, codebook_size, resolution, trained=False)


def load_weights(model: Any, path: Path) -> None:
    """Load a safetensors state dict (all keys, exact shapes) into `model`; cached per file digest."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ weights not found: {path} (the tiny preset's shipped asset: reinstall the "
                                f"package, or rebuild it with `lumo codec train-vq`, docs/stage3_uti.md)")
    key = ("weights", base.file_sha256(path))
    if key not in _FITTED:
        _FITTED[key] = load_file(str(path))
    model.load_state_dict(_FITTED[key], strict=True)


def save_weights(model: Any, path: Path) -> str:
    """Write the state dict as safetensors (no metadata: the bytes are a function of the weights);
    returns the file's sha256."""
    from safetensors.torch import save

    from ..storage import write_file

    path = Path(path)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sorted(model.state_dict().items())}
    write_file(path, save(sd))
    return base.file_sha256(path)


@torch.no_grad()
def _init_codebook(model: Any, seed: int) -> None:
    """diffusers initialises the codebook to U(-1/n, 1/n): far smaller than the encoder's latents,
    so nearly every cell would pick the same few codes. Draw a Gaussian codebook matched to the
    per-channel latent mean/std measured on seeded noise images, so random presets give
    spread-out, content-dependent codes (used by 'full', which only serves benchmarks)."""
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


@torch.no_grad()
def _fit_tiny(model: Any, seed: int, resolution: int) -> None:
    """Data-dependent init of the tiny preset, so its codes say what is where like a trained
    tokenizer's do (a purely random one kept little of an image's colour or shape). No training:
    1. zero the last conv of every encoder residual branch (SkipInit): random branches mix the
       whole image into every cell; without them a cell's latent depends on its neighbourhood only;
    2. quant_conv = PCA of the encoder features over a generic procedural image set (flat and
       gradient backgrounds, random rectangles / ellipses / triangles in random colours), so the
       codebook space keeps the directions the features vary most in; post_quant_conv maps
       back (the transpose);
    3. codebook = seeded k-means (k-means++ init, fixed iterations) of those projected latents.
    Statistics in float64; every step is a function of (seed, resolution, codebook size)."""
    enc = model.encoder
    for name, mod in enc.named_modules():
        if name.endswith("conv2") and ".resnets." in name:
            mod.weight.zero_()
            mod.bias.zero_()
    cells = (resolution // _factor(model)) ** 2
    n = int(np.clip(-(-2 * FIT_CELLS // cells), *FIT_IMAGES))
    x = torch.from_numpy(procedural_images(n, resolution, seed)) * 2 - 1
    h = torch.cat([enc(x[i: i + 64]) for i in range(0, len(x), 64)])  # [N, L, g, g], the encode path's dtype
    feats = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).double().numpy()  # [cells, L]
    d = model.quantize.embedding.weight.shape[1]
    mu = feats.mean(0)
    c = feats - mu
    cov = np.einsum("ni,nj->ij", c, c) / len(c)  # einsum loops, not BLAS: no thread-dependent sums
    w, v = np.linalg.eigh(cov)
    proj = v[:, np.argsort(w)[::-1][:d]].T  # [d, L], top principal directions
    proj *= np.sign(proj[np.arange(d), np.abs(proj).argmax(1)])[:, None]  # fixed sign per direction
    model.quant_conv.weight.copy_(torch.from_numpy(proj[:, :, None, None]))
    model.quant_conv.bias.copy_(torch.from_numpy(-proj @ mu))
    model.post_quant_conv.weight.copy_(torch.from_numpy(proj.T[:, :, None, None].copy()))
    model.post_quant_conv.bias.copy_(torch.from_numpy(mu))
    z = np.einsum("nl,dl->nd", c, proj)
    rng = np.random.default_rng([seed, 7])
    if len(z) > FIT_CELLS:
        z = z[np.sort(rng.permutation(len(z))[:FIT_CELLS])]
    k = model.quantize.embedding.weight.shape[0]
    model.quantize.embedding.weight.copy_(torch.from_numpy(kmeans(z, k, KMEANS_ITERS, rng)))


def _assign(z: np.ndarray, centres: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Nearest centre per row, in cache-sized chunks (|z|^2 is constant per row: left out)."""
    ee = (centres * centres).sum(1)
    return np.concatenate([(ee - 2.0 * (z[i: i + chunk] @ centres.T)).argmin(1) for i in range(0, len(z), chunk)])


def kmeans(z: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Float64 Lloyd's k-means with k-means++ seeding; an empty cluster keeps its centre."""
    n = len(z)
    centres = np.empty((k, z.shape[1]))
    centres[0] = z[rng.integers(n)]
    d2 = ((z - centres[0]) ** 2).sum(1)
    for j in range(1, k):
        tot = d2.sum()
        i = rng.choice(n, p=d2 / tot) if tot > 0 else rng.integers(n)
        centres[j] = z[i]
        d2 = np.minimum(d2, ((z - z[i]) ** 2).sum(1))
    return lloyd(z, centres, iters)


def lloyd(z: np.ndarray, centres: np.ndarray, iters: int) -> np.ndarray:
    """`iters` Lloyd steps from `centres` (updated in place and returned); an empty cluster keeps its centre."""
    for _ in range(iters):
        a = _assign(z, centres)
        sums = np.zeros_like(centres)
        np.add.at(sums, a, z)
        cnt = np.bincount(a, minlength=len(centres))
        full = cnt > 0
        centres[full] = sums[full] / cnt[full, None]
    return centres


def procedural_images(n: int, size: int, seed: int) -> np.ndarray:
    """Generic procedural RGB images, float32 [n, 3, size, size] in [0, 1]: a flat or linear-gradient
    background in a random colour with 0-5 random rectangles / ellipses / triangles (random colour,
    size 8-50% of the side, anywhere, overlapping). Image i depends only on (seed, i)."""
    from PIL import Image, ImageDraw

    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, 101, i])
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if rng.random() < 0.3:
            t = np.linspace(0.0, 1.0, size)[:, None, None]
            grad = np.broadcast_to(a * (1 - t) + b * t, (size, size, 3))  # top to bottom
            if rng.random() >= 0.5:
                grad = grad.transpose(1, 0, 2)  # left to right
            im = Image.fromarray(np.ascontiguousarray(grad).astype(np.uint8))
        else:
            im = Image.new("RGB", (size, size), tuple(int(v) for v in a))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(0, 6))):
            s = rng.uniform(0.08, 0.5) * size
            cx, cy = rng.uniform(0, size, 2)
            box = [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            kind = int(rng.integers(3))
            if kind == 0:
                draw.rectangle(box, fill=fill)
            elif kind == 1:
                draw.ellipse(box, fill=fill)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=fill)
        out[i] = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
    return out


def _factor(model: Any) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


def _load_pretrained(ref: str) -> Any:
    from diffusers import VQModel

    sub = _subfolder(ref)
    try:
        model = VQModel.from_pretrained(ref, subfolder=sub) if sub else VQModel.from_pretrained(ref)
    except Exception as e:  # noqa: BLE001 - re-raised with the reference and the way out
        raise ValueError(
            f"image.model={ref!r}: cannot load VQModel weights ({type(e).__name__}: {e}). Use a preset "
            f"({', '.join(IMAGE_VQ_PRESETS)}) or a local diffusers VQModel directory / cached hub id.") from e
    return model.eval()


class VQImageAdapter(base.WeightsHandOff):
    """ImageAdapter (lumo_ray.codecs.base) over a diffusers VQModel."""

    deterministic_decode = True

    def __init__(self, conf: dict[str, Any], cfg: ImageConfig, runtime: RuntimeConfig):
        self.cfg, self.runtime = cfg, runtime
        self.device = torch.device(runtime.device)
        self.dtype = _DTYPES[runtime.dtype]
        self._model: Any = None
        self._weights: dict | None = None  # use_weights: built elsewhere, assigned on first use
        self.factor = 2 ** (len(conf.get("block_out_channels", (64,))) - 1)  # (diffusers' defaults)
        if cfg.resolution <= 0 or cfg.resolution % self.factor:
            raise ValueError(f"image.resolution={cfg.resolution} must be a positive multiple of the VQ "
                             f"downsampling factor {self.factor}")
        self.image_size = cfg.resolution
        self.grid = cfg.resolution // self.factor
        self.tokens_per_image = self.grid * self.grid
        self.codebook_size = int(conf.get("num_vq_embeddings", 256))
        # diffusers: the codebook vectors have latent_channels dims unless vq_embed_dim says otherwise
        self.embed_dim = int(conf.get("vq_embed_dim") or conf.get("latent_channels", 3))

    @property
    def model(self) -> Any:
        """The VQModel, built (presets) or loaded on first use under the configured thread count
        (the 'full' preset's codebook is scaled from encoder outputs, whose rounding depends on it)."""
        if self._model is None:
            c = self.cfg
            with torch_threads(getattr(self.runtime, "threads", torch.get_num_threads())):
                if self._weights is not None:
                    m, self._weights = _from_weights(c.model, c.codebook_size, c.resolution, self._weights), None
                elif c.model in IMAGE_VQ_PRESETS:
                    m = _build_preset(c.model, c.seed, c.codebook_size, c.resolution, trained=uses_tiny_vq_weights(c))
                else:
                    m = _load_pretrained(c.model)
            m = m.to(self.device)
            if self.dtype != m.dtype:  # (a float32 .to(dtype) would only trigger a diffusers warning)
                m = m.to(self.dtype)
            if _factor(m) != self.factor or int(m.quantize.embedding.weight.shape[1]) != self.embed_dim:
                raise ValueError(f"image.model={self.cfg.model!r}: weights do not match their config")
            self._model = m.eval()
        return self._model

    def _random_preset(self) -> bool:
        return self.cfg.model in IMAGE_VQ_PRESETS and not uses_tiny_vq_weights(self.cfg)

    def identity(self) -> dict:
        model = image_model_identity(self.cfg)
        if self._random_preset():
            # an untrained preset (data-dependent init): named by its weights
            model = f"{model.split('@')[0]}@{state_digest(self.model)}"
        return {"kind": "vq", "model": model,
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

