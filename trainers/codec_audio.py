"""`lumo codec train-audio`: fit the tiny EnCodec preset on Ray Train (one CPU worker by default).

Thin: the fit and its metrics are library code (lumo_ray/codecs/audio_train.py); this file hands them
to a TorchTrainer through trainers/core.py's `launch` / `RayContext` and reads metrics.json back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lumo_ray.config import LumoConfig, dump_config, to_dict
from lumo_ray.tracking import open_tracker

from trainers.core import RayContext, launch, storage_of


def _worker(config: dict) -> None:
    from lumo_ray.codecs.audio_train import train_tiny_audio

    cfg: LumoConfig = config["cfg"]
    ctx = RayContext()
    if ctx.rank != 0:  # (run_codec_audio refuses num_workers != 1; kept for safety)
        return
    tracker = open_tracker(Path(cfg.codec_audio.out), cfg.tracking, "codec_audio", to_dict(cfg.codec_audio))
    step = [0]

    def report(m: dict) -> None:
        step[0] += 1
        ctx.report(m)
        tracker.log(step[0], m)

    train_tiny_audio(cfg.codec_audio, log=lambda s: print(s, flush=True), report=report,
                     out_dir=Path(cfg.codec_audio.out))
    tracker.close()


def run_codec_audio(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """Fit on Ray Train; returns the run's metrics.json (model.safetensors beside it)."""
    from lumo_ray.packaged import real_data_dir
    from lumo_ray.storage import locate, resolve

    c = cfg.codec_audio
    if c.num_workers != 1:
        raise ValueError(f"codec_audio.num_workers={c.num_workers}: the tiny audio codec fits on exactly one worker "
                         f"(its statistics and k-means are single-stream)")
    if not locate(c.out).is_local:
        raise ValueError(f"codec_audio.out={c.out!r}: give a local or shared-FS directory")
    c.out = resolve(c.out)  # absolute: the worker runs in another directory
    if c.max_real_clips > 0:  # absolute, and a missing folder is an error rather than no real clips
        c.real_data = str(real_data_dir(c.real_data).resolve())
    if c.storage_path:
        c.storage_path = resolve(c.storage_path)
    dump_config(cfg, c.out)
    launch(_worker, {"cfg": cfg}, c, storage_of(c, c.out), "codec_audio", address, section="codec_audio")
    m = json.loads((Path(c.out) / "metrics.json").read_text())
    lo = f"bw{min(c.bandwidths):g}"
    b = m.get(lo, {})
    p = b.get("probe")
    log(f"tiny EnCodec at {min(c.bandwidths):g} kbps: "
        + (f"waveform probe count {p['count']:.3f} length {p['length']:.3f} pitch {p['pitch']:.3f}, synthetic SNR "
           f"{b['snr_db']:.2f} dB log-mel L1 {b['log_mel_l1']:.3f}" if p else "no synthetic eval")
        + (f"; real SNR {b['real_snr_db']:.2f} dB log-mel L1 {b['real_log_mel_l1']:.3f}" if "real_snr_db" in b else "")
        + f"; weights {Path(c.out) / 'model.safetensors'} (sha256 {m['weights_sha256'][:16]}...), {m['seconds']:.0f}s")
    return m
