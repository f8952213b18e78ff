"""EnCodec audio adapter through `transformers.EncodecModel` (docs/stage3_uti.md).

Models: the offline presets 'tiny-24k' / 'tiny-48k' (tiny dims) and 'full-24k' / 'full-48k' (the
published facebook/encodec_24khz / _48khz architecture, random weights), all built from an
`EncodecConfig`; anything else goes to `EncodecModel.from_pretrained` (a hub id or a local directory
holding real weights). 'tiny-24k' with seed 0 loads TRAINED weights shipped in the package
(codecs/assets/encodec_tiny24k/model.safetensors, made by `lumo codec train-audio`,
codecs/audio_train.py; its identity is their sha256); every other preset / seed is the random init
drawn under the config seed (codecs/exact_init.py).

Normalization (`load` / `prepare`), in this order:
  1. read with libsndfile (float WAV, FLAC, OGG...); a long file is read only up to max_seconds
     plus a small margin (so a 10-minute WavCaps file costs what a 10 s clip costs);
  2. fit channels to the codec with `channel_policy` (mix / first / strict);
  3. resample with soxr to the codec rate;
  4. length, on codec frame boundaries: a clip longer than max_seconds is cut to the largest whole
     number of frames within max_seconds; a shorter clip is zero-padded only up to its next frame
     boundary (never to max_seconds: padding to max would turn every short clip into a tail of
     silence codes that the LM then has to learn). So every clip is a whole number of frames and
     T varies with the clip; the sequence builder crops on frame boundaries where it needs to.
The record says what was done (orig_rate, orig_channels, orig_seconds, channel_op, resampled,
kept_fraction, padded_seconds, seconds, frames).

Batching (encode_batch): clips are grouped by exact length, so a clip always follows the code
path it follows alone (same chunk plan; the 48 kHz model's time-group-norm and non-causal convs
would otherwise see batch padding), and the 48 kHz scales are computed clip by clip. Because
PyTorch's conv/LSTM kernels are not bitwise batch-invariant, `batch_invariant=True`
then runs the model clip by clip: codes identical to single-clip encoding, whatever the batching.
`batch_invariant=False` runs each length group in one call for throughput (see encode_batch).

48 kHz chunking: EnCodec-48k encodes 1 s chunks every 0.99 s and normalizes each chunk by its RMS
(a 'scale'). Codes of all chunks are concatenated in time (as the original `encodec` package does),
so a 2 s clip gives 150 + 150 + 3 = 303 code frames, not 300; the per-chunk scales go to
side_info['scales'] and `decode` needs them. The code length T(n) is strictly increasing in the
number of clip frames n, so `decode` recovers n from T alone (no extra side info).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import AudioConfig, ConfigError, RuntimeConfig
from ..integrity import PRESET_TODO, verify_once
from ..token_space import AUDIO_SERIALIZATION
from . import base
from .base import (AUDIO_PRESETS, AudioClip, AudioCodes, MediaError, assign_weights, audio_model_identity,
                   model_identity, state_digest, uses_tiny_audio_weights)

# Extra source seconds read / resampled beyond max_seconds, so the resampler's filter sees real
# signal at the cut (checked: the kept samples are bit-identical to resampling the whole file).
_READ_MARGIN_S = 0.1

# Published hyper-parameters (EncodecConfig defaults are facebook/encodec_24khz; the 48 kHz model
# differs as in transformers' conversion script). Tiny presets keep the real ratios (hop 320).
_FULL_24K: dict[str, Any] = dict(
    sampling_rate=24_000, audio_channels=1, target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0],
    upsampling_ratios=[8, 5, 4, 2], num_filters=32, hidden_size=128, num_lstm_layers=2,
    num_residual_layers=1, codebook_size=1024, norm_type="weight_norm", use_causal_conv=True,
    normalize=False, chunk_length_s=None, overlap=None, pad_mode="reflect")
_FULL_48K: dict[str, Any] = dict(
    _FULL_24K, sampling_rate=48_000, audio_channels=2, target_bandwidths=[3.0, 6.0, 12.0, 24.0],
    norm_type="time_group_norm", use_causal_conv=False, normalize=True, chunk_length_s=1.0,
    overlap=0.01)
_TINY = dict(num_filters=4, hidden_size=16, num_lstm_layers=1)
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-24k": dict(_FULL_24K, **_TINY),
    "tiny-48k": dict(_FULL_48K, **_TINY),
    "full-24k": _FULL_24K,
    "full-48k": _FULL_48K,
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# EMA bookkeeping buffers of the codebooks: unused at inference, not shipped (embed_avg = embed on load)
_NOT_SHIPPED = (".codebook.embed_avg", ".codebook.cluster_size")
_LOADED: dict[str, dict] = {}  # weights file digest -> state dict: one read per process


def build_audio_adapter(cfg: AudioConfig, runtime: RuntimeConfig,
                        batch_invariant: Optional[bool] = None) -> "EncodecAdapter":
    """Build the configured EnCodec adapter (presets are built offline: shipped or random-init weights).
    batch_invariant (see EncodecAdapter.encode_batch): None takes runtime.batch_invariant."""
    if cfg.kind != "encodec":
        raise ValueError(f"audio.kind={cfg.kind!r}: only 'encodec' has an adapter")
    if batch_invariant is None:
        batch_invariant = bool(getattr(runtime, "batch_invariant", True))
    return EncodecAdapter(cfg, runtime, batch_invariant=batch_invariant)


def _build_preset(name: str, seed: int, trained: bool = False) -> Any:
    """A preset EncodecModel: the random init of (name, seed), or (trained=True, the 'tiny-24k' preset)
    the shipped trained weights."""
    from transformers import EncodecConfig, EncodecModel

    from .exact_init import reinit_

    conf = EncodecConfig(**PRESET_CONFIGS[name])
    if trained:
        if name != base.TINY_AUDIO_PRESET:
            raise ValueError(f"trained weights ship for {base.TINY_AUDIO_PRESET!r} only, not {name!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = EncodecModel(conf)
        verify_once(base.TINY_AUDIO_WEIGHTS.parent, "shipped audio preset", PRESET_TODO)
        load_weights(model, base.TINY_AUDIO_WEIGHTS)
        return model.eval()
    # fork_rng: building does not disturb the caller's global RNG. The weights are then redrawn so
    # that they (and the preset's identity) are the same on every CPU (codecs/exact_init.py).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EncodecModel(conf)
    reinit_(model, seed)
    _init_codebooks(model, seed)
    return model


def _from_weights(name: str, weights: dict) -> Any:
    """A preset EncodecModel holding weights built in another process (EncodecAdapter.built_weights):
    the architecture on the meta device, then those tensors assigned, so none is drawn (the full-size
    random init takes seconds of CPU at one thread) and the codes and identity are the built ones."""
    from transformers import EncodecConfig, EncodecModel

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = EncodecModel(EncodecConfig(**PRESET_CONFIGS[name]))
    return assign_weights(model, weights)


def tiny_init(seed: int) -> Any:
    """The random 'tiny-24k' preset of a seed (the starting point of `lumo codec train-audio`)."""
    return _build_preset(base.TINY_AUDIO_PRESET, seed, trained=False)


def load_weights(model: Any, path: Path) -> None:
    """Load a weights file written by save_weights into `model` (every shipped key, exact shapes; the
    codebooks' EMA buffers are rebuilt: embed_avg = embed, cluster_size = 0). Cached per file digest."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EnCodec weights not found: {path} (the tiny audio preset's shipped asset: reinstall "
                                f"the package, or rebuild it with `lumo codec train-audio`, docs/stage3_uti.md)")
    key = base.file_sha256(path)
    if key not in _LOADED:
        _LOADED[key] = load_file(str(path))
    sd = _LOADED[key]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    wrong = [k for k in missing if not k.endswith(_NOT_SHIPPED)] + list(unexpected)
    if wrong:
        raise ValueError(f"{path}: does not match the EnCodec architecture ({len(wrong)} keys differ, "
                         f"e.g. {wrong[:3]})")
    with torch.no_grad():
        for layer in model.quantizer.layers:
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
            layer.codebook.cluster_size.zero_()


def save_weights(model: Any, path: Path) -> str:
    """Write the state dict (without the codebooks' EMA buffers) as safetensors, no metadata: the bytes
    are a function of the weights. Returns the file's sha256."""
    from safetensors.torch import save

    from ..storage import write_file

    path = Path(path)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sorted(model.state_dict().items())
          if not k.endswith(_NOT_SHIPPED)}
    write_file(path, save(sd))
    return base.file_sha256(path)


@torch.no_grad()
def _init_codebooks(model: Any, seed: int) -> None:
    """transformers initialises codebooks to zeros (every code would be 0). Draw each RVQ level's
    codebook from the per-dimension mean/std of the residual it quantizes, measured on seeded
    noise with a spread of loudness (what k-means init does with real data, minus the data), so
    the random presets give spread-out, seed-dependent codes as a trained model does. Measured in
    float64 on a copy and rounded (exact_init.round_bits), so every CPU draws the same codebooks."""
    import copy

    from .exact_init import exact_uniform, round_bits, unit_uniform

    g = torch.Generator().manual_seed(seed)
    c = model.config
    seg = c.sampling_rate // 10
    lo, hi = math.log(0.003), math.log(0.3)
    gains = torch.exp(lo + (exact_uniform((20,), g) + 1) / 2 * (hi - lo))
    noise = unit_uniform((1, c.audio_channels, 20 * seg), g) * gains.repeat_interleave(seg)
    if c.normalize:  # the 48 kHz model sees unit-RMS chunks
        noise = noise / noise.pow(2).mean().sqrt()
    model.eval()
    m64 = copy.deepcopy(model).double()
    residual = m64.encoder(noise)  # [1, D, T]
    for layer, layer64 in zip(model.quantizer.layers, m64.quantizer.layers):
        mu, sd = round_bits(residual.mean(dim=(0, 2))), round_bits(residual.std(dim=(0, 2)))
        embed = (mu[None] + sd[None] * unit_uniform(tuple(layer.codebook.embed.shape), g)).float()
        for book in (layer.codebook, layer64.codebook):  # the float64 copy quantizes with the float32 book
            book.embed.copy_(embed)
            book.embed_avg.copy_(embed)
        residual = residual - layer64.decode(layer64.encode(residual))


def _model_config(ref: str) -> Any:
    """The EncodecConfig of a preset or of a hub id / local directory (config.json only, no weights)."""
    from transformers import EncodecConfig

    if ref in AUDIO_PRESETS:
        return EncodecConfig(**PRESET_CONFIGS[ref])
    try:
        return EncodecConfig.from_pretrained(ref)
    except Exception as e:  # noqa: BLE001 - re-raised with the reference and the way out
        raise ValueError(
            f"audio.model={ref!r}: cannot read its EnCodec config ({type(e).__name__}: {e}). Use a "
            f"preset ({', '.join(AUDIO_PRESETS)}) or a local directory / cached hub id with the weights."
        ) from e


def _load_pretrained(ref: str) -> Any:
    from transformers import EncodecModel

    try:
        return EncodecModel.from_pretrained(ref)
    except Exception as e:  # noqa: BLE001 - re-raised with the reference and the way out
        raise ValueError(
            f"audio.model={ref!r}: cannot load EnCodec weights ({type(e).__name__}: {e}). Use a "
            f"preset ({', '.join(AUDIO_PRESETS)}) or a local directory / cached hub id with the weights."
        ) from e


def _wav_truncated(extra_info: str) -> Optional[str]:
    """libsndfile reads a truncated WAV silently; its log says 'data : N (should be M)'."""
    m = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", extra_info, re.MULTILINE)
    if m:
        declared, actual = int(m.group(1)), int(m.group(2))
        # 0 and 0xFFFFFFFF are streaming writers' "size unknown", not truncation.
        if actual < declared and declared not in (0, 0xFFFFFFFF):
            return f"truncated audio file: header declares {declared} data bytes, file holds {actual}"
    return None


class EncodecAdapter(base.WeightsHandOff):
    """EnCodec behind the AudioAdapter protocol (local codes 0..codebook_size-1, int64 [K, T])."""

    def __init__(self, cfg: AudioConfig, runtime: RuntimeConfig, batch_invariant: bool = True):
        self.cfg = cfg
        self.runtime = runtime
        self.batch_invariant = batch_invariant
        self.device = torch.device(runtime.device)
        # Half precision is for accelerators; CPU always runs float32, and so does the fitted tiny preset
        # (its ELUs work on offsets of up to a few hundred: half precision would lose the signal under them).
        self.dtype = torch.float32 if self.device.type == "cpu" or uses_tiny_audio_weights(cfg) \
            else _DTYPES[runtime.dtype]
        # Sizes come from the model config alone; the weights are built on first use (`model`), so a
        # loader worker (load/prepare) or a driver that only needs the token space never builds them.
        c = _model_config(cfg.model)
        self._model: Any = None
        self._weights: Optional[dict] = None  # use_weights: built elsewhere, assigned on first use
        self.bandwidth = float(cfg.bandwidth)
        supported = [float(b) for b in c.target_bandwidths]
        if self.bandwidth not in supported:
            raise ConfigError(f"audio.bandwidth={cfg.bandwidth} is not supported by audio.model={cfg.model!r}; "
                              f"choose one of {supported} kbps")
        self.sample_rate: int = int(c.sampling_rate)
        self.channels: int = int(c.audio_channels)
        self.codebook_size: int = int(c.codebook_size)
        self.samples_per_frame: int = int(c.hop_length)
        self.frame_rate: float = self.sample_rate / self.samples_per_frame
        # transformers' EncodecResidualVectorQuantizer.get_num_quantizers_for_bandwidth, from the config
        self.num_codebooks: int = max(1, math.floor(self.bandwidth * 1000 / (math.log2(c.codebook_size) * c.frame_rate)))
        self.chunk_length: Optional[int] = c.chunk_length
        self.chunk_stride: Optional[int] = c.chunk_stride
        self.max_frames = int(math.floor(cfg.max_seconds * self.sample_rate / self.samples_per_frame + 1e-9))
        if self.max_frames < 1:
            raise ConfigError(f"audio.max_seconds={cfg.max_seconds} is shorter than one codec frame "
                              f"({self.samples_per_frame / self.sample_rate:.4f} s)")

    @property
    def model(self) -> Any:
        """The EncodecModel, built (presets) or loaded on first use under the configured thread count
        (preset codebooks are scaled from encoder outputs, whose rounding depends on it)."""
        if self._model is None:
            from ..runtime import torch_threads

            with torch_threads(getattr(self.runtime, "threads", torch.get_num_threads())):
                if self._weights is not None:
                    m, self._weights = _from_weights(self.cfg.model, self._weights), None
                elif self.cfg.model in AUDIO_PRESETS:
                    m = _build_preset(self.cfg.model, self.cfg.seed, trained=uses_tiny_audio_weights(self.cfg))
                else:
                    m = _load_pretrained(self.cfg.model)
            self._model = m.to(device=self.device, dtype=self.dtype).eval()
        return self._model

    def _random_preset(self) -> bool:
        return self.cfg.model in AUDIO_PRESETS and not uses_tiny_audio_weights(self.cfg)

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict:
        # a preset is its weights: one changed init is another token space (a checkpoint or hub id: its files /
        # id); the trained tiny preset is named by its shipped file's sha256, without building the model
        if uses_tiny_audio_weights(self.cfg):
            model = audio_model_identity(self.cfg)
        elif self.cfg.model in AUDIO_PRESETS:
            model = f"{self.cfg.model}@{state_digest(self.model)}"
        else:
            model = model_identity(self.cfg.model, self.cfg.seed, AUDIO_PRESETS)
        return {"kind": "encodec", "model": model,
                "sample_rate": self.sample_rate, "channels": self.channels, "bandwidth": self.bandwidth,
                "num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size,
                "serialization": AUDIO_SERIALIZATION}

    # ------------------------------------------------------------------ normalization
    def load(self, path: str) -> AudioClip:
        """Read a file with libsndfile and normalize it (see module docstring)."""
        import soundfile as sf

        p = Path(path)
        if not p.is_file():
            raise MediaError(path, "file not found")
        try:
            info = sf.info(str(p))
        except Exception as e:  # noqa: BLE001 - libsndfile's reason goes into the message
            raise MediaError(path, f"not a readable audio file (libsndfile: {e})") from e
        reason = _wav_truncated(info.extra_info or "")
        if reason:
            raise MediaError(path, reason)
        if info.frames <= 0 or info.samplerate <= 0:
            raise MediaError(path, "empty audio file (0 samples)")
        n_read = min(info.frames, math.ceil((self.cfg.max_seconds + _READ_MARGIN_S) * info.samplerate))
        try:
            data, rate = sf.read(str(p), frames=n_read, dtype="float32", always_2d=True)
        except Exception as e:  # noqa: BLE001
            raise MediaError(path, f"cannot decode audio (libsndfile: {e})") from e
        return self._normalize(data.T, int(rate), str(path), orig_seconds=info.frames / info.samplerate)

    def prepare(self, wav: np.ndarray, rate: int, name: str = "<array>") -> AudioClip:
        """Normalize an in-memory waveform: 1-D [N] (mono) or channels-first [C, N]; float in
        [-1, 1], or integer PCM (scaled by its full range, as libsndfile does)."""
        x = np.asarray(wav)
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            x = (x.astype(np.float64) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise MediaError(name, f"expected a waveform [N] or [channels, N], got shape {x.shape}")
        if x.shape[0] > 16 and x.shape[1] <= 16:
            raise MediaError(name, f"shape {x.shape} looks like [N, channels]; pass channels first")
        if x.shape[1] == 0:
            raise MediaError(name, "empty audio (0 samples)")
        orig_seconds = x.shape[1] / rate
        x = x[:, : math.ceil((self.cfg.max_seconds + _READ_MARGIN_S) * rate)]  # same cut as load()
        return self._normalize(x.astype(np.float32, copy=False), int(rate), name, orig_seconds)

    def _normalize(self, x: np.ndarray, rate: int, name: str, orig_seconds: float) -> AudioClip:
        """x: float32 [C, n] (possibly cut to max + margin), orig_seconds: the full source length."""
        import soxr

        if x.shape[1] == 0:
            raise MediaError(name, "empty audio (0 samples)")
        if rate <= 0:
            raise MediaError(name, f"invalid sample rate {rate}")
        if orig_seconds < self.cfg.min_seconds:
            raise MediaError(name, f"too short: {orig_seconds:.4f} s < audio.min_seconds={self.cfg.min_seconds}")
        if not np.isfinite(x).all():
            raise MediaError(name, "audio holds NaN or infinite samples")
        orig_channels = int(x.shape[0])
        x, channel_op = self._fit_channels(x, name)
        resampled = rate != self.sample_rate
        if resampled:
            # soxr wants [frames, channels]; HQ is deterministic for a given input.
            x = soxr.resample(np.ascontiguousarray(x.T), rate, self.sample_rate, quality="HQ").T
        x = np.ascontiguousarray(x, dtype=np.float32)
        spf = self.samples_per_frame
        n_content = min(x.shape[1], int(round(orig_seconds * self.sample_rate)))
        frames = min(self.max_frames, math.ceil(n_content / spf))
        n = frames * spf
        kept = min(n_content, n)
        out = np.zeros((self.channels, n), dtype=np.float32)
        out[:, :kept] = x[:, :kept]
        record = {
            "orig_rate": rate, "orig_channels": orig_channels, "orig_seconds": round(orig_seconds, 6),
            "channel_op": channel_op, "resampled": resampled,
            "kept_fraction": round(min(1.0, kept / self.sample_rate / orig_seconds), 6),
            "padded_seconds": round((n - kept) / self.sample_rate, 6),
            "seconds": round(n / self.sample_rate, 6), "frames": frames,
        }
        return AudioClip(wav=out, record=record)

    def _fit_channels(self, x: np.ndarray, name: str) -> tuple[np.ndarray, str]:
        have, want, policy = x.shape[0], self.channels, self.cfg.channel_policy
        if have == want:
            return x, "none"
        if policy == "strict":
            raise MediaError(name, f"has {have} channel(s) but the codec takes {want} "
                                   f"(audio.channel_policy='strict' refuses a channel mismatch)")
        if have >= want and policy == "first":
            return x[:want], f"first_{want}"
        if want == 1:
            return x.mean(axis=0, keepdims=True), "mix_to_mono"
        # want == 2: a mono source is duplicated; more than 2 channels are mixed down, then duplicated.
        mono = x if have == 1 else x.mean(axis=0, keepdims=True)
        return np.repeat(mono, want, axis=0), "dup_mono" if have == 1 else "mix_to_mono_dup"

    # ------------------------------------------------------------------ chunk plan
    def _chunks(self, n_samples: int) -> list[tuple[int, int]]:
        """(offset, length) of each encoder chunk, exactly as EncodecModel.encode cuts them."""
        if self.chunk_length is None:
            return [(0, n_samples)]
        stride = self.chunk_stride or self.chunk_length
        return [(o, min(self.chunk_length, n_samples - o)) for o in range(0, n_samples, stride)]

    def code_frames(self, clip_frames: int) -> int:
        """Number of code frames T for a clip of `clip_frames` codec frames (= clip_frames at 24 kHz)."""
        return sum(math.ceil(length / self.samples_per_frame)
                   for _, length in self._chunks(clip_frames * self.samples_per_frame))

    def clip_frames(self, code_frames: int) -> int:
        """Inverse of code_frames (strictly increasing, so binary search); error if T is not reachable."""
        lo, hi = 1, max(1, code_frames)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.code_frames(mid) < code_frames:
                lo = mid + 1
            else:
                hi = mid
        if self.code_frames(lo) != code_frames:
            raise ValueError(f"{code_frames} code frames is not a valid length for {self.cfg.model!r} "
                             f"(chunked encoding gives {self.code_frames(lo - 1) if lo > 1 else 0} or "
                             f"{self.code_frames(lo)} around it)")
        return lo

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode_batch(self, clips: list[AudioClip]) -> list[AudioCodes]:
        """Encode clips -> int64 [K, T] codes + side_info {'scales': per-chunk floats (48 kHz) or None}.

        batch_invariant=True: the model runs clip by clip, so a clip's codes never depend
        on its batch mates (PyTorch's conv/LSTM kernels are not bitwise batch-invariant and EnCodec's
        argmax flips on near-ties: ~1% of codes differed between batch 12 and batch 1 for full-24k).
        batch_invariant=False: one model call per group of equal-length clips (faster, esp. on GPU);
        codes are then a function of the batch composition, which is still deterministic when
        batches are cut in manifest order. On CPU clip by clip was not slower (16 x 2 s, 1 thread:
        full-24k 3.6 s vs 4.9 s batched), so the invariant mode costs nothing there."""
        out: list[Optional[AudioCodes]] = [None] * len(clips)
        groups: dict[tuple, list[int]] = {}
        for i, clip in enumerate(clips):
            w = clip.wav
            if w.ndim != 2 or w.shape[0] != self.channels or w.shape[1] == 0 or w.shape[1] % self.samples_per_frame:
                raise ValueError(f"clip {i}: expected float32 [{self.channels}, k*{self.samples_per_frame}] "
                                 f"from load()/prepare(), got shape {w.shape}")
            groups.setdefault(w.shape, []).append(i)
        batches = [(shape, [i]) for shape, idx in groups.items() for i in idx] if self.batch_invariant \
            else list(groups.items())
        for shape, idx in batches:
            x = torch.from_numpy(np.stack([clips[i].wav for i in idx])).to(self.device, self.dtype)
            codes, scales = [], []
            for off, length in self._chunks(shape[1]):
                c, s = self._encode_chunk(x[..., off: off + length])  # [B, K, t], [B] or None
                codes.append(c)
                scales.append(s)
            all_codes = torch.cat(codes, dim=-1).to("cpu", torch.int64).numpy()
            for j, i in enumerate(idx):
                sc = None if scales[0] is None else [float(s[j]) for s in scales]
                out[i] = AudioCodes(codes=np.ascontiguousarray(all_codes[j]), side_info={"scales": sc})
        return out  # type: ignore[return-value]

    def _encode_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """EncodecModel._encode_frame, except that the 48 kHz scale (RMS of the mono mix) is computed
        clip by clip: a batched reduction can differ from a single-clip one in the last bit, and the
        scales are stored in the shards."""
        scale = None
        if self.model.config.normalize:
            scale = torch.cat([((xi.sum(dim=0) / xi.shape[0]).pow(2).mean().sqrt() + 1e-8).reshape(1) for xi in x])
            x = x / scale.view(-1, 1, 1)
        codes = self.model.quantizer.encode(self.model.encoder(x), self.bandwidth)  # [K, B, t]
        return codes.transpose(0, 1), scale

    def _decode_chunk(self, codes: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        """EncodecModel._decode_frame: [1, K, t] codes -> [1, C, t * hop] audio."""
        out = self.model.decoder(self.model.quantizer.decode(codes.transpose(0, 1)))
        return out if scale is None else out * scale

    @torch.no_grad()
    def decode(self, codes: AudioCodes) -> np.ndarray:
        """float32 [channels, frames * samples_per_frame] at sample_rate. Missing 48k scales decode
        unscaled (e.g. generated codes), which is the best available without them."""
        c = np.asarray(codes.codes)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[0] > len(self.model.quantizer.layers) or c.shape[1] < 1:
            raise ValueError(f"codes must be [K<= {len(self.model.quantizer.layers)}, T>=1], got {c.shape}")
        if c.min() < 0 or c.max() >= self.codebook_size:
            raise ValueError(f"codes out of range 0..{self.codebook_size - 1}: min {c.min()}, max {c.max()}")
        n = self.clip_frames(c.shape[1]) * self.samples_per_frame
        plan = self._chunks(n)
        scales = (codes.side_info or {}).get("scales")
        if scales is not None and len(scales) != len(plan):
            raise ValueError(f"side_info['scales'] has {len(scales)} entries, the code length implies {len(plan)} chunks")
        t = torch.from_numpy(c.astype(np.int64))[None].to(self.device)  # [1, K, T]
        frames, pos = [], 0
        for k, (_, length) in enumerate(plan):
            f = math.ceil(length / self.samples_per_frame)
            frames.append(self._decode_chunk(t[..., pos: pos + f], None if scales is None else float(scales[k])))
            pos += f
        if len(frames) == 1:
            wav = frames[0]
        else:
            # transformers' static overlap-add (linear cross-fade over the 1% chunk overlap).
            wav = self.model._linear_overlap_add(frames, self.chunk_stride or 1)
        wav = wav[0, :, :n].float().cpu().numpy()
        if wav.shape[1] < n:  # cannot happen with EnCodec's decoder, kept as a guard
            wav = np.pad(wav, ((0, 0), (0, n - wav.shape[1])))
        return np.ascontiguousarray(wav, dtype=np.float32)
