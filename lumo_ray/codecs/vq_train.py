"""Training of the tiny VQ image codec (the `uti.image` 'tiny' preset), plain PyTorch (no Ray).

`train_tiny_vq(cfg.codec)` starts from the preset's data-dependent init (`image_vq.tiny_init`:
SkipInit encoder, PCA quant_conv, k-means codebook) and trains every weight on synthetic shape
images (drawn like lumo_ray.data.synth) plus generic procedural images:

    loss = w.L1(x, x^) + w.MSE(x, x^) + |sg(z) - e|^2 + beta |z - sg(e)|^2     (pixels in [-1, 1])

(w: per-pixel weights, 1 + fg_weight on foreground pixels, see `foreground_weights`)

with the straight-through estimator, and dead-code restarts (codes unused since the last restart
move onto random encoder latents of the current batch). One thread, a seeded data order and seeded
restarts: the same config gives byte-identical weights. `trainers/codec_vq.py` runs it on Ray Train.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CodecTrainConfig, ImageConfig, RuntimeConfig
from ..data.synth import synthetic_shape_images
from ..eval.metrics import reconstruction_metrics
from ..runtime import torch_threads
from .base import ImageInput, save_fit
from . import image_vq


def _adapter(resolution: int, codebook_size: Optional[int], model: Any = None) -> "image_vq.VQImageAdapter":
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
    prep = _adapter(resolution, None)
    return [prep.load(str(f)) for f in files]


def _lr(step: int, c: CodecTrainConfig) -> float:
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
    a = _adapter(c.resolution, c.codebook_size, model)
    syn = reconstruction_metrics(a, eval_images)
    out = {"synth_psnr": syn["psnr"], "synth_ssim": syn["ssim"], "synth_codes_used": syn["codes_used"],
           "synth_n": syn["n"]}
    if real:
        r = reconstruction_metrics(a, real)
        out.update(real_psnr=r["psnr"], real_ssim=r["ssim"], real_n=r["n"], real_codes_used=r["codes_used"])
    model.train()
    return out


def train_tiny_vq(c: CodecTrainConfig, log: Callable = print, report: Callable | None = None,
                  out_dir: Path | None = None) -> tuple[Any, dict]:
    """Train the tiny VQ codec; writes out_dir/model.safetensors and metrics.json when out_dir is
    given. Returns (model, metrics)."""
    with torch_threads(c.threads):
        return _train(c, log, report, out_dir)


def _train(c: CodecTrainConfig, log: Callable, report: Callable | None, out_dir: Path | None) -> tuple[Any, dict]:
    t0 = time.time()
    model = image_vq.tiny_init(c.seed, c.codebook_size, c.resolution)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    prep = _adapter(c.resolution, None)  # the tiny preset's prepare at this resolution
    syn = synthetic_shape_images(c.synth_images, c.synth_seed, prep)
    parts = [np.stack([x.pixels for x in syn])] if syn else []
    if c.procedural_images:
        parts.append(image_vq.procedural_images(c.procedural_images, c.resolution, c.procedural_seed))
    if not parts:
        raise ValueError("codec.synth_images and codec.procedural_images are both 0: nothing to train on")
    data = torch.from_numpy(np.concatenate(parts)) * 2 - 1
    eval_images = synthetic_shape_images(c.eval_images, c.eval_seed, prep)
    real = real_images(c.real_data, c.max_real_images, c.resolution)
    log(f"[codec] tiny VQ: {sum(p.numel() for p in model.parameters())} params, {len(data)} train images "
        f"({len(syn)} synthetic seed {c.synth_seed}, {c.procedural_images} procedural), {len(eval_images)} eval, "
        f"{len(real)} real; {c.steps} steps x batch {c.batch}; data ready in {time.time() - t0:.1f}s")
    init = evaluate(model, c, eval_images, real)
    log(f"[codec] init: synth PSNR {init['synth_psnr']:.2f} dB SSIM {init['synth_ssim']:.3f}")
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    gen = torch.Generator().manual_seed(c.seed)
    k = model.quantize.embedding.weight.shape[0]
    usage = torch.zeros(k, dtype=torch.long)
    perm, pos, restarts = torch.randperm(len(data), generator=gen), 0, 0
    hist: list[dict] = []
    for step in range(1, c.steps + 1):
        if pos + c.batch > len(perm):
            perm, pos = torch.randperm(len(data), generator=gen), 0
        x = data[perm[pos: pos + c.batch]]
        pos += c.batch
        for gr in opt.param_groups:
            gr["lr"] = _lr(step - 1, c)
        loss, lp, idx, zf = vq_step_loss(model, x, c.beta, c.fg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(idx, minlength=k)
        if c.restart_every and step % c.restart_every == 0 and step < c.steps:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                pick = torch.randint(len(zf), (len(dead),), generator=gen)
                with torch.no_grad():
                    model.quantize.embedding.weight[dead] = zf[pick]
                restarts += len(dead)
            usage.zero_()
        rec = {"step": step, "loss": loss.item(), **lp}
        if step % c.log_every == 0 or step == c.steps:
            psnr = 10 * math.log10(4.0 / max(lp["mse"], 1e-12))  # [-1, 1] pixels: peak-to-peak 2
            log(f"[codec] step {step}/{c.steps} loss {rec['loss']:.4f} (l1 {lp['l1']:.4f} mse {lp['mse']:.5f} "
                f"vq {lp['vq']:.4f}) train PSNR {psnr:.2f} dB, {restarts} code restarts, {time.time() - t0:.0f}s")
            hist.append(rec)
            if report:
                report(rec)
    final = evaluate(model, c, eval_images, real)
    model.eval()
    seconds = time.time() - t0
    metrics = {**final, "init": init, "steps": c.steps, "seconds": seconds, "code_restarts": restarts,
               "threads": c.threads, "history": hist,
               "params": int(sum(p.numel() for p in model.parameters()))}
    log(f"[codec] done in {seconds:.0f}s: synth eval PSNR {final['synth_psnr']:.2f} dB SSIM {final['synth_ssim']:.3f} "
        f"({final['synth_codes_used']} codes used)" + (f"; real PSNR {final['real_psnr']:.2f} dB SSIM "
                                                       f"{final['real_ssim']:.3f}" if real else ""))
    if out_dir is not None:
        save_fit(out_dir, model, metrics, image_vq.save_weights, log)
    return model, metrics
