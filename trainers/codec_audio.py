"""`lumo codec train-audio`: fit the tiny EnCodec preset on Ray Train (one CPU worker by default).

Thin: the fit and its metrics are library code (lumo_ray/codecs/audio_train.py); trainers/codec_fit.py launches it
on one Ray Train worker and reads metrics.json back; this file words the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lumo_ray.config import LumoConfig

from trainers.codec_fit import fit_codec


def run_codec_audio(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """Fit on Ray Train; returns the run's metrics.json (model.safetensors beside it)."""
    m = fit_codec(cfg, "codec_audio", "lumo_ray.codecs.audio_train:train_tiny_audio", "codec_audio",
                  "max_real_clips", "the tiny audio codec fits on exactly one worker (its statistics and "
                  "k-means are single-stream)", address)
    c = cfg.codec_audio
    lo = f"bw{min(c.bandwidths):g}"
    b = m.get(lo, {})
    p = b.get("probe")
    log(f"tiny EnCodec at {min(c.bandwidths):g} kbps: "
        + (f"waveform probe count {p['count']:.3f} length {p['length']:.3f} pitch {p['pitch']:.3f}, synthetic SNR "
           f"{b['snr_db']:.2f} dB log-mel L1 {b['log_mel_l1']:.3f}" if p else "no synthetic eval")
        + (f"; real SNR {b['real_snr_db']:.2f} dB log-mel L1 {b['real_log_mel_l1']:.3f}" if "real_snr_db" in b else "")
        + f"; weights {Path(c.out) / 'model.safetensors'} (sha256 {m['weights_sha256'][:16]}...), {m['seconds']:.0f}s")
    return m
