"""Training of the tiny EnCodec preset (`uti.audio` model 'tiny-24k', seed 0): a closed-form fit of
every weight of the EnCodec architecture (transformers.EncodecModel), plain PyTorch / NumPy, no Ray.

`train_tiny_audio(cfg.codec_audio)` starts from the random preset (`audio.tiny_init`) and fits it on
synthetic beep clips (drawn like lumo_ray.data.synth: count, length, pitch) plus generic procedural
clips (fit_codec):

- encoder: residual branches and the LSTM switched off (they add 0); each conv, first to last, is the
  PCA of the patches it sees, biased so that every ELU works in its identity range: a linear
  filterbank. The last conv (into the 16-d codebook space) is a reduced-rank regression of each
  frame's own 320 waveform samples, so latent distances are waveform distances;
- RVQ: each of the 32 levels a k-means (float64, k-means++ seeding, fixed iterations) of the residual
  the levels before leave; the levels of the configured bandwidths (1.5 / 3 kbps: levels 0-3) on every
  frame, the deeper ones on a subsample;
- decoder: a causal linear predictor of the waveform from the quantized latents (the current and two
  previous frames): ridge least squares into the principal coefficients of 40-sample segments, then
  exact polyphase expansions to 24 kHz.

Why closed form: gradient training of this 168k-parameter architecture from its random init (Adam,
waveform L1 + multi-resolution STFT losses, straight-through RVQ) did not leave the silent output in
the minutes a 2-core CPU allows (measured: probe at chance after 600 steps), and gradient steps from
the fit degrade it (its ELU operating points sit on large offsets). The fit takes under a minute and
reads the beeps back exactly (docs/stage3_uti.md "Tiny audio codec").

One thread, float64 statistics, seeded k-means: the same config gives byte-identical weights on the
same machine. `trainers/codec_audio.py` runs it on Ray Train (`lumo codec train-audio`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config import AudioCodecTrainConfig, AudioConfig, RuntimeConfig
from ..data.synth import synthetic_beeps
from ..runtime import torch_threads
from . import audio
from .base import save_fit

PRESET = "tiny-24k"
RATE = 24_000


def _adapter(model: Any = None, bandwidth: float = 1.5) -> "audio.EncodecAdapter":
    """A tiny-24k adapter (its prepare / encode / decode path) around `model`."""
    a = audio.build_audio_adapter(AudioConfig(model=PRESET, bandwidth=bandwidth, max_seconds=2.0, seed=-1),
                                  RuntimeConfig(), batch_invariant=True)
    a._model = model
    return a


def procedural_clips(n: int, seed: int, seconds: float = 2.0) -> np.ndarray:
    """Generic procedural clips, float32 [n, seconds * 24000]: a noise floor at a random level plus 1-6
    events (a tone with 1-3 harmonics, a chirp, or a band of noise), each at a random onset, duration
    (0.03-1 s), level (-40 to 0 dBFS) and frequency (80-8000 Hz, log-uniform), with 5 ms ramps; half
    of them over a slow drift (2-60 Hz, -30 to -6 dBFS). Not the beeps' grammar: they keep the codec
    general (real clips). Clip i depends only on (seed, i)."""
    n_s = int(seconds * RATE)
    out = np.empty((n, n_s), np.float32)
    t_all = np.arange(n_s) / RATE
    for i in range(n):
        rng = np.random.default_rng([seed, 7, i])
        x = rng.normal(0.0, 10 ** rng.uniform(-4, -2), n_s)
        for _ in range(int(rng.integers(1, 7))):
            kind = int(rng.integers(3))
            dur = float(np.exp(rng.uniform(np.log(0.03), np.log(1.0))))
            s = int(rng.uniform(0, seconds - dur) * RATE)
            m = max(2, int(dur * RATE))
            t = t_all[:m]
            amp = 10 ** (rng.uniform(-40, 0) / 20)
            f = float(np.exp(rng.uniform(np.log(80), np.log(8000))))
            if kind == 0:
                ev = sum(rng.uniform(0.2, 1.0) ** h * np.sin(2 * np.pi * f * (h + 1) * t + rng.uniform(0, 2 * np.pi))
                         for h in range(int(rng.integers(1, 4))) if f * (h + 1) < RATE / 2 - 500)
            elif kind == 1:
                f1 = float(np.exp(rng.uniform(np.log(80), np.log(8000))))
                ev = np.sin(2 * np.pi * (f * t + (f1 - f) / (2 * dur) * t ** 2))
            else:
                spec = np.fft.rfft(rng.normal(0.0, 1.0, m))
                fr = np.fft.rfftfreq(m, 1.0 / RATE)
                spec[(fr < f / 1.5) | (fr > f * 1.5)] = 0
                ev = np.fft.irfft(spec, m)
                ev = ev / (np.abs(ev).max() + 1e-9)
            ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)
            x[s:s + m] += amp * np.asarray(ev) * ramp
        drift = np.random.default_rng([seed, 8, i])
        if drift.random() < 0.5:  # a slow drift (2-60 Hz) under it all, as real recordings often have
            f = float(np.exp(drift.uniform(np.log(2), np.log(60))))
            x += 10 ** (drift.uniform(-30, -6) / 20) * np.sin(2 * np.pi * f * t_all + drift.uniform(0, 2 * np.pi))
        out[i] = np.clip(x, -1.0, 1.0)
    return out


def real_clips(folder: str, n: int) -> list[tuple[str, Any]]:
    """The first n real clips (*/audio/*.wav of folder, sorted), loaded like the adapter does: (name, clip)."""
    if n <= 0:
        return []
    from ..packaged import real_data_dir

    root = real_data_dir(folder)
    files = sorted(root.glob("*/audio/*.wav"))[:n]
    a = _adapter()
    return [(str(f.relative_to(root)), a.load(str(f))) for f in files]


# ------------------------------------------------------------------ the closed-form fit

ENC_CONVS = (0, 3, 6, 9, 12)   # encoder.layers: the conv and the four strided convs, fitted by PCA in this order
ENC_OUT = 15                   # encoder.layers: the last conv (to the codebook dimension), reduced-rank regression
SEG = 40          # samples per position of the decoder's 600 Hz stage (stride 320 / 8)
Z_TAPS = 3        # latent frames (current and 2 previous) the decoder's first conv passes on
OFFSET_S = 2.0    # offset of the decoder's sample-valued channels (predictions within +-2 stay linear)


class _Stop(Exception):
    pass


def _inner_input(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """What layer.conv receives when layer runs on x (a conv's padded input; a transposed conv's input)."""
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0])
        raise _Stop

    h = layer.conv.register_forward_pre_hook(hook)
    try:
        layer(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


class _Moments:
    """Running float64 sums for a mean / covariance / cross-covariance."""

    def __init__(self) -> None:
        self.n, self.sf, self.sy, self.ff, self.fy = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, f: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        f = f.double()
        self.n += len(f)
        self.sf = self.sf + f.sum(0)
        self.ff = self.ff + f.T @ f
        if y is not None:
            y = y.double()
            self.sy = self.sy + y.sum(0)
            self.fy = self.fy + f.T @ y

    def cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.sf / self.n
        return mu, self.ff / self.n - torch.outer(mu, mu)

    def ridge(self, rel: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta [F, Y], intercept [Y]) of the ridge fit y ~ f theta + b (penalty rel x mean feature variance)."""
        mu, cff = self.cov()
        my = self.sy / self.n
        cfy = self.fy / self.n - torch.outer(mu, my)
        lam = rel * float(torch.diagonal(cff).mean()) + 1e-12
        theta = torch.linalg.solve(cff + lam * torch.eye(len(cff), dtype=cff.dtype), cfy)
        return theta, my - mu @ theta


def _set_weight(conv: Any, w: torch.Tensor, b: torch.Tensor) -> None:
    """Set a (weight-normed) conv's weight and bias; an all-zero norm group keeps a tiny direction."""
    w = w.float().clone()
    dead = w.abs().sum(tuple(range(1, w.dim()))) == 0
    if dead.any():
        w[dead] = 1e-12
    conv.weight = w  # through weight_norm's right_inverse: magnitude = norm, direction = w
    conv.bias.copy_(b.float())


def _patches(layer: Any, h: torch.Tensor, last_tap_only: bool) -> torch.Tensor:
    """[frames, C_in * k] receptive fields of layer.conv (stride-1 or strided) over h [B, C_in, N]."""
    conv = layer.conv
    p = _inner_input(layer, h).unfold(-1, conv.kernel_size[0], conv.stride[0])  # [B, C, T, k]
    if last_tap_only:
        p = p[..., -1:]
    return p.permute(0, 2, 1, 3).reshape(-1, p.shape[1] * p.shape[3])


def _pca_conv(layer: Any, h: torch.Tensor, chunk: int, last_tap_only: bool, margin: float) -> None:
    """Set an encoder conv to the top principal directions of the patches it sees on h (its receptive
    field, or only the current frame), biased so its outputs on h stay >= margin x their largest
    excursion (the next ELU is then the identity on them); margin 0: centred."""
    conv = layer.conv
    k, out_ch, in_ch = conv.kernel_size[0], conv.out_channels, conv.in_channels
    mom = _Moments()
    for i in range(0, len(h), chunk):
        mom.add(_patches(layer, h[i: i + chunk], last_tap_only))
    mu, cov = mom.cov()
    evals, evecs = torch.linalg.eigh(cov)
    u = evecs[:, torch.argsort(evals, descending=True)[:out_ch]].T  # [out, F]
    u = u * torch.sign(u[torch.arange(out_ch), u.abs().argmax(1)])[:, None]  # fixed sign per direction
    bias = -(u @ mu)
    if margin > 0:
        hi = torch.zeros(out_ch, dtype=torch.float64)
        for i in range(0, len(h), chunk):
            dev = (_patches(layer, h[i: i + chunk], last_tap_only).double() - mu) @ u.T
            hi = torch.maximum(hi, dev.abs().amax(0))
        bias = bias + margin * hi + 1e-3
    w = torch.zeros(out_ch, in_ch, k, dtype=torch.float64)
    if last_tap_only:
        w[:, :, -1] = u
    else:
        w[:] = u.reshape(out_ch, in_ch, k)
    _set_weight(conv, w, bias)


def _rrr_conv(layer: Any, h: torch.Tensor, x: torch.Tensor, chunk: int, rel: float) -> None:
    """Set the encoder's last conv (current frame only) by reduced-rank regression: the latent is the
    coordinates, in the top principal directions, of the least-squares prediction of the frame's own
    waveform block (hop samples) from the frame's features. Latent distances are then waveform
    distances (the decoder reads the block back with orthonormal directions), so RVQ k-means
    minimises waveform error."""
    conv = layer.conv
    out_ch, in_ch = conv.out_channels, conv.in_channels
    hop = x.shape[-1] // h.shape[-1]
    mom = _Moments()
    for i in range(0, len(h), chunk):
        f = _patches(layer, h[i: i + chunk], last_tap_only=True)
        mom.add(f, x[i: i + chunk, 0].reshape(-1, hop))
    theta, _ = mom.ridge(rel)  # [F, hop]
    mu, cff = mom.cov()
    evals, evecs = torch.linalg.eigh(theta.T @ cff @ theta)  # covariance of the prediction
    v = evecs[:, torch.argsort(evals, descending=True)[:out_ch]]  # [hop, out]
    v = v * torch.sign(v[v.abs().argmax(0), torch.arange(out_ch)])[None, :]
    w = (theta @ v).T  # [out, F]
    full = torch.zeros(out_ch, in_ch, conv.kernel_size[0], dtype=torch.float64)
    full[:, :, -1] = w
    _set_weight(conv, full, -(w @ mu))


def _ridge_phases(a: torch.Tensor, target: torch.Tensor, st: int, chunk: int, rel: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge fit of a causal transposed conv (kernel 2 st, stride st, trimmed right) from a [B, C_in, T]
    to target [B, C_out, T * st]: out[m st + p] = W[:, :, p]^T a[m] + W[:, :, p + st]^T a[m - 1] + b_p.
    Returns (W [C_in, C_out, 2 st], per-phase intercepts [st, C_out])."""
    cin, cout = a.shape[1], target.shape[1]
    moms = [_Moments() for _ in range(st)]
    for i in range(0, len(a), chunk):
        cur = a[i: i + chunk].permute(0, 2, 1)  # [B, T, C_in]
        prev = torch.cat([torch.zeros_like(cur[:, :1]), cur[:, :-1]], 1)
        f = torch.cat([cur, prev], -1).reshape(-1, 2 * cin)
        y = target[i: i + chunk].permute(0, 2, 1).reshape(cur.shape[0], cur.shape[1], st, cout)
        for p in range(st):
            moms[p].add(f, y[:, :, p].reshape(-1, cout))
    w = torch.zeros(cin, cout, 2 * st, dtype=torch.float64)
    icpt = torch.zeros(st, cout, dtype=torch.float64)
    for p, mom in enumerate(moms):
        theta, icpt[p] = mom.ridge(rel)
        w[:, :, p], w[:, :, p + st] = theta[:cin], theta[cin:]
    return w, icpt


def _fit_decoder(model: Any, z: torch.Tensor, x: torch.Tensor, chunk: int, margin: float, rel: float) -> None:
    """The decoder as a causal linear predictor of the waveform from the latents, built top-down:
    - the 600 Hz stage holds, per position p, the coefficients c[p] of the 40 samples [40p, 40p + 40) in
      the top principal directions of the data's 40-sample segments (one channel stays a constant);
    - the transposed convs after it are fixed polyphase expansions (3 kHz: 8 samples per position in 8
      channels, 12 kHz: 2, 24 kHz: 1) and the last conv reads the sample channel: exact;
    - the first conv passes the current and Z_TAPS - 1 previous latent frames on (and a constant), and
      the 75 -> 600 Hz transposed conv is the ridge least-squares prediction of c from them (per phase).
    Every channel an ELU sees carries an offset that keeps it positive, so the ELUs are the identity."""
    L = model.decoder.layers
    d = z.shape[1]
    conv0, up8, up5, up4, up2, last = L[0].conv, L[3].conv, L[6].conv, L[9].conv, L[12].conv, L[15].conv
    n_c = up8.out_channels - 1  # coefficients; the last 600 Hz channel is the constant
    # principal directions of the 40-sample segments
    mom = _Moments()
    for i in range(0, len(x), chunk):
        mom.add(x[i: i + chunk, 0].reshape(-1, SEG))
    mu_s, cov = mom.cov()
    evals, evecs = torch.linalg.eigh(cov)
    ub = evecs[:, torch.argsort(evals, descending=True)[:n_c]].T  # [n_c, SEG]
    ub = ub * torch.sign(ub[torch.arange(n_c), ub.abs().argmax(1)])[:, None]
    off_c = float(np.sqrt(SEG)) * margin  # |c| <= |segment - mean| <= 2 sqrt(SEG) for samples in [-1, 1]
    const = 1.0
    # first conv: a[t] = [z[t], z[t-1], .., const] + offsets
    off_z = margin * z.abs().amax(dim=(0, 2)).double() + 1e-3  # [d]
    w0 = torch.zeros(conv0.out_channels, d, conv0.kernel_size[0], dtype=torch.float64)
    b0 = torch.full((conv0.out_channels,), const, dtype=torch.float64)
    for j in range(Z_TAPS):
        w0[j * d:(j + 1) * d, :, -1 - j] = torch.eye(d, dtype=torch.float64)
        b0[j * d:(j + 1) * d] = off_z
    _set_weight(conv0, w0, b0)
    a = torch.cat([L[2](L[1](L[0](z[i: i + chunk]))) for i in range(0, len(z), chunk)])  # ELU input == output
    # 75 -> 600 Hz: ridge prediction of c (+ offset) from a[t], a[t-1]; per-phase intercepts via the constant
    segs = x[:, 0].reshape(len(x), -1, SEG).double()  # [B, P, SEG]
    c = ((segs - mu_s) @ ub.T).permute(0, 2, 1)  # [B, n_c, P]
    target = torch.cat([c + off_c, torch.full_like(c[:, :1], const)], 1)
    used = Z_TAPS * d
    w8, icpt = _ridge_phases(a[:, :used], target, 8, chunk, rel)
    full = torch.zeros(up8.in_channels, up8.out_channels, 16, dtype=torch.float64)
    full[:used] = w8
    b8 = icpt.mean(0)
    full[conv0.out_channels - 1, :, :8] = ((icpt - b8) / const).T  # the constant channel: per-phase intercepts
    _set_weight(up8, full, b8)
    # 600 Hz -> 3 kHz: 8 samples per position, expanded from the coefficients (+ OFFSET_S)
    w5 = torch.zeros(up5.in_channels, up5.out_channels, 10, dtype=torch.float64)
    per = SEG // 5
    for u in range(5):
        w5[:n_c, :per, u] = ub[:, u * per:(u + 1) * per]
        # cancel the coefficients' offset and add the segment mean, per phase, through the constant channel
        w5[n_c, :per, u] = (mu_s[u * per:(u + 1) * per] - off_c * ub[:, u * per:(u + 1) * per].sum(0)) / const
    _set_weight(up5, w5, torch.full((up5.out_channels,), OFFSET_S, dtype=torch.float64))
    # 3 kHz -> 12 kHz -> 24 kHz: polyphase selection (each output channel reads one input channel)
    w4 = torch.zeros(up4.in_channels, up4.out_channels, 8, dtype=torch.float64)
    for v in range(4):
        for ch in range(2):
            w4[2 * v + ch, ch, v] = 1.0
    _set_weight(up4, w4, torch.tensor([0.0, 0.0] + [OFFSET_S] * (up4.out_channels - 2), dtype=torch.float64))
    w2 = torch.zeros(up2.in_channels, up2.out_channels, 4, dtype=torch.float64)
    for ch in range(2):
        w2[ch, 0, ch] = 1.0
    _set_weight(up2, w2, torch.tensor([0.0] + [OFFSET_S] * (up2.out_channels - 1), dtype=torch.float64))
    wl = torch.zeros(1, last.in_channels, last.kernel_size[0], dtype=torch.float64)
    wl[0, 0, -1] = 1.0
    _set_weight(last, wl, torch.tensor([-OFFSET_S], dtype=torch.float64))


def _run(layer: Any, h: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([layer(h[i: i + chunk]) for i in range(0, len(h), chunk)])


def _kmeans(z: np.ndarray, k: int, iters: int, rng: np.random.Generator, plus_plus: bool) -> np.ndarray:
    """Float64 Lloyd's k-means (image_vq.kmeans with k-means++ seeding; else seeded on k distinct random
    points, much faster for the deep levels); an empty cluster keeps its centre."""
    from .image_vq import kmeans, lloyd

    if plus_plus:
        return kmeans(z, k, iters, rng)
    return lloyd(z, z[np.sort(rng.permutation(len(z))[:k])].copy(), iters)


def fit_rvq(model: Any, z: torch.Tensor, first: int, levels: int, seed: int, iters: int, deep_iters: int,
            max_points: int) -> None:
    """Fit the RVQ codebooks greedily from level `first` on: each level is a k-means (float64, fixed
    iterations) of the residual z [B, D, T] leaves after the levels before it (through the quantizer's
    own float32 encode / decode). Levels < `levels` (the trained bandwidths'): k-means++ seeding, every
    frame; deeper levels: deep_iters iterations seeded on random frames of a seeded subsample of at most
    max_points frames."""
    q = model.quantizer.layers
    r = z.permute(0, 2, 1).reshape(-1, z.shape[1])[:, :, None].permute(2, 1, 0)  # [1, D, N]: one long sequence
    for layer in q[:first]:
        r = r - layer.decode(layer.encode(r))
    for lvl in range(first, len(q)):
        pts = r[0].T.double().numpy()
        rng = np.random.default_rng([seed, 11, lvl])
        k = q[lvl].codebook.embed.shape[0]
        if lvl < levels:
            book = _kmeans(pts, k, iters, rng, plus_plus=True)
        else:
            if len(pts) > max_points:
                pts = pts[np.sort(rng.permutation(len(pts))[:max(max_points, k)])]
            book = _kmeans(pts, k, deep_iters, rng, plus_plus=False)
        book = torch.from_numpy(book).float()
        q[lvl].codebook.embed.copy_(book)
        q[lvl].codebook.embed_avg.copy_(book)
        r = r - q[lvl].decode(q[lvl].encode(r))


def _quantized(model: Any, z: torch.Tensor, n_q: int) -> torch.Tensor:
    r, out = z, torch.zeros_like(z)
    for layer in model.quantizer.layers[:n_q]:
        qz = layer.decode(layer.encode(r))
        out, r = out + qz, r - qz
    return out


@torch.no_grad()
def fit_codec(model: Any, wavs: np.ndarray, n_qs: list[int], seed: int, iters: int, deep_iters: int = 2,
              max_points: int = 8192, chunk: int = 16, margin: float = 3.0, ridge: float = 1e-6) -> None:
    """The closed-form fit of every weight (no gradient steps), a function of (data, seed):
    1. every residual branch is switched off (its last conv's magnitude 0, the conv shortcut the identity)
       and every LSTM adds 0 (zero weights: its residual connection passes its input on);
    2. encoder convs, first to last: the top principal directions of the patches each sees on the data,
       biased so their outputs stay positive on the data (every ELU is then the identity, the encoder a
       linear filterbank); the last conv, into the codebook space: a reduced-rank regression of each
       frame's own waveform samples (_rrr_conv), centred;
    3. the RVQ codebooks, level by level: k-means of the residuals (fit_rvq);
    4. the decoder: a causal linear predictor of the waveform from the quantized latents (clip i
       quantized with n_qs[i % len(n_qs)] codebooks), see _fit_decoder.
    The residual branches and LSTMs stay in the model, adding 0."""
    for block in [m for m in model.modules() if type(m).__name__ == "EncodecResnetBlock"]:
        block.block[-1].conv.parametrizations.weight.original0.zero_()
        block.block[-1].conv.bias.zero_()
        sc = block.shortcut.conv
        _set_weight(sc, torch.eye(sc.out_channels)[:, :, None], torch.zeros(sc.out_channels))
    for lstm in [m for m in model.modules() if isinstance(m, torch.nn.LSTM)]:
        for p in lstm.parameters():
            p.zero_()
    h = torch.from_numpy(np.ascontiguousarray(wavs, dtype=np.float32))[:, None]
    x = h
    for i, layer in enumerate(model.encoder.layers):
        if i in ENC_CONVS:
            _pca_conv(layer, h, chunk, last_tap_only=False, margin=margin)
        elif i == ENC_OUT:
            _rrr_conv(layer, h, x, chunk, ridge)
        h = _run(layer, h, chunk)
    fit_rvq(model, h, 0, max(n_qs), seed, iters, deep_iters, max_points)
    zq = torch.cat([_quantized(model, h[i: i + 1], n_qs[i % len(n_qs)]) for i in range(len(h))])
    _fit_decoder(model, zq, x, chunk, margin, ridge)


def evaluate(model: Any, bandwidths: list[float], eval_wavs: np.ndarray, truths: list[dict],
             real: list[tuple[str, Any]]) -> dict:
    """Per bandwidth, through the adapter path (encode -> decode): the waveform probe's accuracy, SNR and
    log-mel L1 on the synthetic eval clips, and SNR / log-mel L1 of the real clips (the audit's metrics:
    16 kHz mono, aligned)."""
    from ..eval import beep_probe, metrics

    model.eval()
    out: dict[str, Any] = {}
    for bw in sorted(set(float(b) for b in bandwidths)):
        a = _adapter(model, bw)
        rec: dict[str, Any] = {}
        if len(eval_wavs):
            p = beep_probe.probe_codec(a, eval_wavs, truths)
            rec.update(probe=p["accuracy"], snr_db=p["snr_db"], log_mel_l1=p["log_mel_l1"], n=p["n"])
        if real:
            snr, lm = [], []
            for _, clip in real:
                dec = a.decode(a.encode_batch([clip])[0])
                ref, est = metrics.align_audio(clip.wav, a.sample_rate, dec, a.sample_rate, 16000)
                snr.append(metrics.snr_db(ref, est))
                lm.append(metrics.log_mel_l1(ref, est, 16000))
            rec.update(real_snr_db=float(np.mean(snr)), real_log_mel_l1=float(np.mean(lm)), real_n=len(real))
        out[f"bw{bw:g}"] = rec
    return out


def train_tiny_audio(c: AudioCodecTrainConfig, log: Callable = print, report: Optional[Callable] = None,
                     out_dir: Optional[Path] = None) -> tuple[Any, dict]:
    """Fit the tiny EnCodec preset; writes out_dir/model.safetensors and metrics.json when out_dir is
    given. Returns (model, metrics)."""
    with torch_threads(c.threads):
        return _train(c, log, report, out_dir)


def _line(name: str, m: dict) -> str:
    p = m.get("probe")
    return (f"{name}: " + (f"probe count {p['count']:.3f} length {p['length']:.3f} pitch {p['pitch']:.3f}, synthetic "
                           f"SNR {m['snr_db']:.2f} dB log-mel L1 {m['log_mel_l1']:.3f}" if p else "")
            + (f"; real SNR {m['real_snr_db']:.2f} dB log-mel L1 {m['real_log_mel_l1']:.3f}"
               if "real_snr_db" in m else ""))


def _train(c: AudioCodecTrainConfig, log: Callable, report: Optional[Callable], out_dir: Optional[Path]
           ) -> tuple[Any, dict]:
    t0 = time.time()
    if not c.bandwidths:
        raise ValueError("codec_audio.bandwidths is empty: name the bandwidths whose codebooks are fitted on "
                         "every frame")
    model = audio.tiny_init(c.seed)
    ref = _adapter(model)
    n_qs = sorted({ref.model.quantizer.get_num_quantizers_for_bandwidth(float(bw)) for bw in c.bandwidths})
    syn, _ = synthetic_beeps(c.synth_clips, c.synth_seed)
    proc = procedural_clips(c.procedural_clips, c.procedural_seed)
    fit = np.concatenate([syn, proc])
    if len(fit) * ref.max_frames < ref.codebook_size:
        raise ValueError(f"{len(fit)} fit clips give {len(fit) * ref.max_frames} frames for a {ref.codebook_size}-code "
                         f"codebook: raise codec_audio.synth_clips / procedural_clips")
    eval_wavs, truths = synthetic_beeps(c.eval_clips, c.eval_seed)
    real = real_clips(c.real_data, c.max_real_clips)
    log(f"[codec] tiny EnCodec: {sum(p.numel() for p in model.parameters())} params; fit on {len(fit)} clips "
        f"({len(syn)} synthetic beeps seed {c.synth_seed}, {len(proc)} procedural seed {c.procedural_seed}), "
        f"eval on {len(eval_wavs)} synthetic (seed {c.eval_seed}) and {len(real)} real; bandwidths "
        f"{list(c.bandwidths)} (codebooks {n_qs}); data ready in {time.time() - t0:.1f}s")
    init = evaluate(model, c.bandwidths, eval_wavs, truths, real)
    log("[codec] " + _line("random init", init[f"bw{min(c.bandwidths):g}"]))
    t1 = time.time()
    fit_codec(model, fit, n_qs, c.seed, c.kmeans_iters, c.deep_kmeans_iters, c.deep_max_frames, margin=c.margin,
              ridge=c.ridge)
    fit_seconds = time.time() - t1
    log(f"[codec] fitted in {fit_seconds:.1f}s")
    final = evaluate(model, c.bandwidths, eval_wavs, truths, real)
    for k, v in final.items():
        log("[codec] " + _line(f"fitted, {k[2:]} kbps", v))
        if report:
            report({"bandwidth": float(k[2:]), **{a: b for a, b in v.items() if not isinstance(b, dict)},
                    **{f"probe_{a}": b for a, b in v.get("probe", {}).items()}})
    for p in model.parameters():
        p.requires_grad_(False)
    seconds = time.time() - t0
    metrics = {**final, "init": init, "fit_seconds": fit_seconds, "seconds": seconds, "threads": c.threads,
               "fit_clips": len(fit), "params": int(sum(p.numel() for p in model.parameters()))}
    if out_dir is not None:
        save_fit(out_dir, model, metrics, audio.save_weights, log)
    return model, metrics
