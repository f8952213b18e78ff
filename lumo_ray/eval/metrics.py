"""Reconstruction metrics on aligned signals: SNR and log-mel L1 for audio, PSNR and SSIM for images,
and an image adapter's PSNR / SSIM over prepared images (reconstruction_metrics).

Audio metrics first resample both signals to one rate, mix to mono and trim to the common length,
so a codec that changes rate or length is still compared sample for sample.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import soxr


def align_audio(ref: np.ndarray, ref_rate: int, est: np.ndarray, est_rate: int, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Mono float64 signals at `rate`, trimmed to the same length."""
    def mono(x: np.ndarray, r: int) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        x = x.mean(axis=0) if x.ndim == 2 else x
        return soxr.resample(x, r, rate) if r != rate else x
    a, b = mono(ref, ref_rate), mono(est, est_rate)
    n = min(len(a), len(b))
    return a[:n], b[:n]


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    noise = np.sum((ref - est) ** 2)
    sig = np.sum(ref ** 2)
    if sig == 0 and noise == 0:
        return float("inf")
    return float(10 * np.log10(max(sig, 1e-20) / max(noise, 1e-20)))


def _mel_filterbank(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    mels = np.linspace(hz_to_mel(0), hz_to_mel(rate / 2), n_mels + 2)
    hz = mel_to_hz(mels)
    bins = np.fft.rfftfreq(n_fft, 1.0 / rate)
    fb = np.zeros((n_mels, len(bins)))
    for i in range(n_mels):
        lo, c, hi = hz[i], hz[i + 1], hz[i + 2]
        up = (bins - lo) / max(c - lo, 1e-9)
        down = (hi - bins) / max(hi - c, 1e-9)
        fb[i] = np.maximum(0, np.minimum(up, down))
    return fb


def log_mel(x: np.ndarray, rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 64) -> np.ndarray:
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    return np.log(power @ _mel_filterbank(rate, n_fft, n_mels).T + 1e-5)


def log_mel_l1(ref: np.ndarray, est: np.ndarray, rate: int) -> float:
    return float(np.mean(np.abs(log_mel(ref, rate) - log_mel(est, rate))))


def psnr(ref: np.ndarray, est: np.ndarray) -> float:
    """PSNR in dB for images in [0, 255] (uint8 or float)."""
    mse = np.mean((np.asarray(ref, np.float64) - np.asarray(est, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(ref: np.ndarray, est: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004, 7x7 uniform window, on luma) for HxWx3 images in [0, 255]."""
    def luma(x):
        x = np.asarray(x, np.float64)
        return x @ np.array([0.299, 0.587, 0.114]) if x.ndim == 3 else x

    a, b = luma(ref), luma(est)
    w = min(7, a.shape[0], a.shape[1])

    def box(x):
        v = np.lib.stride_tricks.sliding_window_view(x, (w, w))
        return v.mean(axis=(-1, -2))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = box(a), box(b)
    var_a = box(a * a) - mu_a ** 2
    var_b = box(b * b) - mu_b ** 2
    cov = box(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def reconstruction_metrics(adapter: Any, images: list) -> dict:
    """Encode -> decode each prepared image (codecs.base.ImageInput) with the adapter's own path; mean
    PSNR / SSIM against the preprocessed input, the per-image values and codebook usage."""
    codes = adapter.encode_batch(images)
    ps, ss = [], []
    for x, c in zip(images, codes):
        ref = (np.transpose(x.pixels, (1, 2, 0)) * 255.0).round().clip(0, 255)
        dec = adapter.decode(c)
        ps.append(psnr(ref, dec))
        ss.append(ssim(ref, dec))
    used = np.unique(np.concatenate(codes)) if codes else np.array([])
    return {"psnr": float(np.mean(ps)) if ps else None, "ssim": float(np.mean(ss)) if ss else None,
            "n": len(images), "psnr_per_image": ps, "ssim_per_image": ss, "codes_used": int(len(used)),
            "codebook_size": int(adapter.codebook_size)}
