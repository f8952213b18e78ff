"""`lumo codec train-vq`: train the tiny VQ image codec on Ray Train (one CPU worker by default).

Thin: the loop, loss and metrics are library code (lumo_ray/codecs/vq_train.py); trainers/codec_fit.py launches it
on one Ray Train worker and reads metrics.json back; this file words the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lumo_ray.config import LumoConfig

from trainers.codec_fit import fit_codec


def run_codec_vq(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """Train on Ray Train; returns the run's metrics.json (model.safetensors beside it)."""
    m = fit_codec(cfg, "codec", "lumo_ray.codecs.vq_train:train_tiny_vq", "codec_vq", "max_real_images",
                  "the tiny codec trains on exactly one worker (its dead-code restarts and data order are "
                  "single-stream)", address)
    c = cfg.codec
    log(f"tiny VQ codec: synthetic eval PSNR {m['synth_psnr']:.2f} dB SSIM {m['synth_ssim']:.3f}"
        + (f", real PSNR {m['real_psnr']:.2f} dB SSIM {m['real_ssim']:.3f}" if "real_psnr" in m else "")
        + f"; weights {Path(c.out) / 'model.safetensors'} (sha256 {m['weights_sha256'][:16]}...), "
          f"{m['seconds']:.0f}s")
    return m
