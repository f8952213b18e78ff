"""`lumo codec train-vq`: train the tiny VQ image codec on Ray Train (one CPU worker by default).

Thin: the loop, loss and metrics are library code (lumo_ray/codecs/vq_train.py); this file hands
them to a TorchTrainer through trainers/core.py's `launch` / `RayContext` and reads metrics.json back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lumo_ray.config import LumoConfig, dump_config, to_dict
from lumo_ray.tracking import open_tracker

from trainers.core import RayContext, launch, storage_of


def _worker(config: dict) -> None:
    from lumo_ray.codecs.vq_train import train_tiny_vq

    cfg: LumoConfig = config["cfg"]
    ctx = RayContext()
    if ctx.rank != 0:  # (run_codec_vq refuses num_workers != 1; kept for safety)
        return
    tracker = open_tracker(Path(cfg.codec.out), cfg.tracking, "codec", to_dict(cfg.codec))

    def report(m: dict) -> None:
        ctx.report(m)
        tracker.log(int(m.get("step", 0)), m)

    train_tiny_vq(cfg.codec, log=lambda s: print(s, flush=True), report=report, out_dir=Path(cfg.codec.out))
    tracker.close()


def run_codec_vq(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """Train on Ray Train; returns the run's metrics.json (model.safetensors beside it)."""
    from lumo_ray.packaged import real_data_dir
    from lumo_ray.storage import locate, resolve

    c = cfg.codec
    if c.num_workers != 1:
        raise ValueError(f"codec.num_workers={c.num_workers}: the tiny codec trains on exactly one worker "
                         f"(its dead-code restarts and data order are single-stream)")
    if not locate(c.out).is_local:
        raise ValueError(f"codec.out={c.out!r}: give a local or shared-FS directory")
    c.out = resolve(c.out)  # absolute: the worker runs in another directory
    if c.max_real_images > 0:  # absolute, and a missing folder is an error rather than no real images
        c.real_data = str(real_data_dir(c.real_data).resolve())
    if c.storage_path:
        c.storage_path = resolve(c.storage_path)
    dump_config(cfg, c.out)
    launch(_worker, {"cfg": cfg}, c, storage_of(c, c.out), "codec_vq", address, section="codec")
    m = json.loads((Path(c.out) / "metrics.json").read_text())
    log(f"tiny VQ codec: synthetic eval PSNR {m['synth_psnr']:.2f} dB SSIM {m['synth_ssim']:.3f}"
        + (f", real PSNR {m['real_psnr']:.2f} dB SSIM {m['real_ssim']:.3f}" if "real_psnr" in m else "")
        + f"; weights {Path(c.out) / 'model.safetensors'} (sha256 {m['weights_sha256'][:16]}...), "
          f"{m['seconds']:.0f}s")
    return m
