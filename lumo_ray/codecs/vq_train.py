"""What the tiny VQ image codec (the `uti.image` 'tiny' preset) trains on and is measured by, plain
PyTorch (no Ray); its training loop is trainers/codec_vq.py's workload on the one loop.

Training (`lumo codec train-vq`) starts from the preset's data-dependent init (`image_vq.tiny_init`:
SkipInit encoder, PCA quant_conv, k-means codebook) and trains every weight on synthetic shape
images (drawn like lumo_ray.data.synth) plus generic procedural images:

    loss = w.L1(x, x^) + w.MSE(x, x^) + |sg(z) - e|^2 + beta |z - sg(e)|^2     (pixels in [-1, 1])

(w: per-pixel weights, 1 + fg_weight on foreground pixels, see `foreground_weights`)

with the straight-through estimator, and dead-code restarts (codes unused since the last restart
move onto random encoder latents of the current batch). One thread, a seeded data order and seeded
restarts: the same config gives byte-identical weights.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..config import CodecTrainConfig, ImageConfig, RuntimeConfig
from ..eval.metrics import reconstruction_metrics
from .base import ImageInput
from . import image_vq


def tiny_adapter(resolution: int, codebook_size: Optional[int], model: Any = None) -> "image_vq.VQImageAdapter":
    """A tiny-preset adapter (its prepare / encode / decode path) around `model`."""
    a = image_vq.build_vq_adapter(ImageConfig(model="tiny", resolution=resolution, codebook_size=codebook_size,
                                              seed=-1), RuntimeConfig())
    a._model = model
    return a


def real_images(folder: str, n: int, resolution: int = 32) -> list[ImageInput]:
    """The first n real images of folder/llava_pretrain/images/*.png, prepared like the adapter does."""
    if not folder or n <= 0:
        return []
    files = sorted((Path(folder) / "llava_pretrain" / "images").glob("*.png"))[:n]
    prep = tiny_adapter(resolution, None)
    return [prep.load(str(f)) for f in files]


def lr_at(step: int, c: CodecTrainConfig) -> float:
    """The learning rate of 0-based step `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / max(1, c.warmup_steps)
    prog = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps))
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def foreground_weights(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W]: 1 + fg_weight where a pixel differs from its image's
    per-channel median (the background) by more than 0.3 summed over channels (pixels in [-1, 1]).
    Small shapes are a few percent of the pixels: unweighted, the loss hardly sees their colour."""
    if fg_weight <= 0:
        return torch.ones_like(x[:, :1])
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]
    fg = ((x - bg).abs().sum(1, keepdim=True) > 0.3).to(x.dtype)
    return 1.0 + fg_weight * fg


def vq_step_loss(model: Any, x: torch.Tensor, beta: float, fg_weight: float = 0.0
                 ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """One forward pass: (loss, parts, code indices [B*g*g], encoder latents [B*g*g, D])."""
    z = model.quant_conv(model.encoder(x))  # [B, D, g, g]
    b, d, g, _ = z.shape
    zf = z.permute(0, 2, 3, 1).reshape(-1, d)
    e = model.quantize.embedding.weight
    with torch.no_grad():
        idx = ((e * e).sum(1)[None, :] - 2.0 * zf @ e.T).argmin(1)
    zq = e[idx]
    vq = F.mse_loss(zq, zf.detach()) + beta * F.mse_loss(zf, zq.detach())
    zst = (zf + (zq - zf).detach()).reshape(b, g, g, d).permute(0, 3, 1, 2)
    xr = model.decoder(model.post_quant_conv(zst))
    w = foreground_weights(x, fg_weight)
    l1, mse = (w * (xr - x).abs()).mean(), (w * (xr - x) ** 2).mean()
    loss = l1 + mse + vq
    return loss, {"l1": l1.item(), "mse": mse.item(), "vq": vq.item()}, idx, zf.detach()


def evaluate(model: Any, c: CodecTrainConfig, eval_images: list[ImageInput], real: list[ImageInput]) -> dict:
    """PSNR / SSIM of encode -> decode through the adapter path (synthetic eval and real images)."""
    model.eval()
    a = tiny_adapter(c.resolution, c.codebook_size, model)
    syn = reconstruction_metrics(a, eval_images)
    out = {"synth_psnr": syn["psnr"], "synth_ssim": syn["ssim"], "synth_codes_used": syn["codes_used"],
           "synth_n": syn["n"]}
    if real:
        r = reconstruction_metrics(a, real)
        out.update(real_psnr=r["psnr"], real_ssim=r["ssim"], real_n=r["n"], real_codes_used=r["codes_used"])
    model.train()
    return out
