"""A waveform probe for the synthetic beeps (lumo_ray.data.synth): reads count, length and pitch from
a waveform with plain signal processing, so a codec's reconstructions can be judged on what a
listener hears, not on its codes.

Fixed and deterministic; every constant is defined from the synthetic grammar (never fitted on
reconstructions), and it reads real (non-reconstructed) synthetic clips at 1.00
(tests/test_audio_codec_trained.py):

- pitch: the dominant frequency of the clip's Hann-windowed spectrum within PITCH_SEARCH_HZ, named by
  the nearest synthetic pitch in log frequency (330 / 660 / 1320 Hz: boundaries at the geometric means);
- envelope: the energy of a short-time spectrum (ENV_NFFT window, ENV_HOP_S hop) in a band of
  +-BAND_SEMITONES around the read pitch, in dB; a frame is "on" within ON_DB of the loudest frame;
- count: runs of "on" frames, after closing gaps shorter than MIN_GAP_S (the grammar's gap is 0.14 s)
  and dropping runs shorter than MIN_RUN_S (the shortest beep is 0.12 s);
- length: the median run duration, 'short' below LENGTH_SPLIT_S (between 0.12 s and 0.36 s), else 'long'.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from ..data import synth

RATE = synth.SAMPLE_RATE
PITCH_SEARCH_HZ = (150.0, 3000.0)
BAND_SEMITONES = 2.0
ENV_NFFT = 1024              # 43 ms at 24 kHz: resolves 330 Hz from its neighbours, shorter than the 0.14 s gap
ENV_HOP_S = 0.005
ON_DB = 12.0
MIN_GAP_S = 0.05
MIN_RUN_S = 0.05
LENGTH_SPLIT_S = float(np.sqrt(synth.LENGTHS["short"] * synth.LENGTHS["long"]))  # 0.208 s
ATTRIBUTES = ("count", "length", "pitch")


def _mono(wav: np.ndarray, rate: int) -> np.ndarray:
    x = np.asarray(wav, dtype=np.float64)
    x = x.mean(axis=0) if x.ndim == 2 else x
    if rate != RATE:
        import soxr

        x = soxr.resample(x, rate, RATE)
    return x


def read_pitch(x: np.ndarray) -> tuple[str, float]:
    """(pitch name, dominant frequency in Hz) of a mono 24 kHz signal."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    f = np.fft.rfftfreq(len(x), 1.0 / RATE)
    band = (f >= PITCH_SEARCH_HZ[0]) & (f <= PITCH_SEARCH_HZ[1])
    f0 = float(f[band][int(np.argmax(spec[band]))])
    names = list(synth.PITCHES)
    dist = [abs(math.log2(f0 / synth.PITCHES[n])) for n in names]
    return names[int(np.argmin(dist))], f0


def band_envelope_db(x: np.ndarray, centre_hz: float) -> np.ndarray:
    """Per-frame energy (dB) within +-BAND_SEMITONES of centre_hz (frames every ENV_HOP_S)."""
    hop = int(round(ENV_HOP_S * RATE))
    if len(x) < ENV_NFFT:
        x = np.pad(x, (0, ENV_NFFT - len(x)))
    pad = np.pad(x, (ENV_NFFT // 2, ENV_NFFT // 2))
    frames = np.lib.stride_tricks.sliding_window_view(pad, ENV_NFFT)[::hop] * np.hanning(ENV_NFFT)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    f = np.fft.rfftfreq(ENV_NFFT, 1.0 / RATE)
    k = 2.0 ** (BAND_SEMITONES / 12)
    band = (f >= centre_hz / k) & (f <= centre_hz * k)
    return 10 * np.log10(power[:, band].sum(axis=1) + 1e-12)


def runs(on: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) frame index pairs of the True runs, gaps < MIN_GAP_S closed, runs < MIN_RUN_S dropped."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))
    rs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
    gap, short = MIN_GAP_S / ENV_HOP_S, MIN_RUN_S / ENV_HOP_S
    merged: list[tuple[int, int]] = []
    for a, b in rs:
        if merged and a - merged[-1][1] < gap:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return [(a, b) for a, b in merged if b - a >= short]


def read_beeps(wav: np.ndarray, rate: int = RATE) -> dict:
    """What a listener would say about a beep clip: {'count', 'length', 'pitch'} plus what was measured
    ('f0_hz', 'durations_s')."""
    x = _mono(wav, rate)
    pitch, f0 = read_pitch(x)
    env = band_envelope_db(x, synth.PITCHES[pitch])
    rs = runs(env >= env.max() - ON_DB)
    durs = [(b - a) * ENV_HOP_S for a, b in rs]
    length = None if not durs else ("short" if float(np.median(durs)) < LENGTH_SPLIT_S else "long")
    return {"count": len(rs), "length": length, "pitch": pitch, "f0_hz": f0, "durations_s": durs}


def accuracy(reads: Iterable[dict], truths: Iterable[dict]) -> dict[str, float]:
    """Per attribute, the fraction of clips read right (truths: {'count', 'length', 'pitch'})."""
    reads, truths = list(reads), list(truths)
    if not truths or len(reads) != len(truths):
        raise ValueError(f"{len(reads)} reads for {len(truths)} clips")
    return {a: float(np.mean([r[a] == t[a] for r, t in zip(reads, truths)])) for a in ATTRIBUTES}


def probe_codec(adapter: Any, wavs: np.ndarray, truths: list[dict]) -> dict:
    """Encode -> decode each clip (float32 [N, samples] at 24 kHz) through an audio adapter and read the
    reconstructions: per-attribute accuracy, mean SNR and log-mel L1 (the audit's, at 16 kHz)."""
    from . import metrics

    clips = [adapter.prepare(w, RATE, f"beeps:{i}") for i, w in enumerate(wavs)]
    reads, snr, lm = [], [], []
    for clip, codes in zip(clips, adapter.encode_batch(clips)):
        dec = adapter.decode(codes)
        reads.append(read_beeps(dec, adapter.sample_rate))
        ref, est = metrics.align_audio(clip.wav, adapter.sample_rate, dec, adapter.sample_rate, 16000)
        snr.append(metrics.snr_db(ref, est))
        lm.append(metrics.log_mel_l1(ref, est, 16000))
    return {"accuracy": accuracy(reads, truths), "snr_db": float(np.mean(snr)), "log_mel_l1": float(np.mean(lm)),
            "n": len(clips), "reads": reads}
