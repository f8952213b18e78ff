"""EnCodec audio adapter: presets, normalization, batched encode, decode, identity, bad media.

Real components only: transformers.EncodecModel with the tiny preset configs, real 48 kHz stereo
float WAVs from the `real_data` fixture, files written with libsndfile.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from lumo_ray.codecs.audio import PRESET_CONFIGS, EncodecAdapter, build_audio_adapter
from lumo_ray.codecs.base import AudioClip, AudioCodes, MediaError
from lumo_ray.config import AudioConfig, RuntimeConfig
from lumo_ray.token_space import AUDIO_SERIALIZATION
from lumo_ray.uti import declared_identity

CPU = RuntimeConfig(device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On this 2-core box, shared with other test processes, OpenMP's spinning threads make a
    tiny encode 20x slower than one thread does; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _adapter(**kw) -> EncodecAdapter:
    return build_audio_adapter(AudioConfig(**kw), CPU, batch_invariant=True)


@pytest.fixture(scope="module")
def a24() -> EncodecAdapter:
    return _adapter(model="tiny-24k", bandwidth=3.0, max_seconds=2.0)


@pytest.fixture(scope="module")
def a48() -> EncodecAdapter:
    return _adapter(model="tiny-48k", bandwidth=6.0, max_seconds=2.0)


@pytest.fixture(scope="module")
def wavs(real_data: Path) -> list[Path]:
    files = sorted(real_data.glob("*/audio/*.wav"))
    assert len(files) >= 6
    return files


# ------------------------------------------------------------------ presets, sizes, identity

def test_preset_is_deterministic_for_a_seed_and_changes_with_it(a24, wavs):
    clip = a24.load(str(wavs[0]))
    again = _adapter(model="tiny-24k", bandwidth=3.0, max_seconds=2.0)
    other = _adapter(model="tiny-24k", bandwidth=3.0, max_seconds=2.0, seed=1)
    c0 = a24.encode_batch([clip])[0].codes
    assert np.array_equal(c0, again.encode_batch([clip])[0].codes)
    assert not np.array_equal(c0, other.encode_batch([clip])[0].codes)
    assert len(np.unique(c0)) > 10  # random codebooks are initialised, not the all-zero default


def test_preset_weights_are_the_same_under_every_cpu_kernel_build():
    """The preset's identity (a digest of its weights) must not depend on the machine: built under
    PyTorch's AVX2 and scalar kernels, and with several threads, the weights are bit-identical (with
    PyTorch's own init the scalar build gave another digest, codecs/exact_init.py)."""
    import os
    import subprocess
    import sys

    code = ("from lumo_ray.codecs.audio import _build_preset; from lumo_ray.codecs.base import state_digest; "
            "print(state_digest(_build_preset('tiny-24k', 0)), state_digest(_build_preset('tiny-48k', 0)))")
    seen = {}
    for cap, threads in (("default", "1"), ("avx2", "1"), (None, "2")):
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if cap:
            env["ATEN_CPU_CAPABILITY"] = cap
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        seen[(cap, threads)] = p.stdout.split()
    assert len({tuple(v) for v in seen.values()}) == 1, seen


def test_exact_init_helpers_are_exact():
    from lumo_ray.codecs.exact_init import exact_uniform, pow2_bound, round_bits

    g = torch.Generator().manual_seed(0)
    x = exact_uniform((4096,), g, bound=pow2_bound(448))
    assert pow2_bound(448) == 2.0 ** -4 and torch.equal(x.float().double(), x)  # exact in float32
    assert x.abs().max() <= 2.0 ** -4 and x.std() == pytest.approx(2.0 ** -4 / 3 ** 0.5, rel=0.05)
    y = torch.tensor([1.0, 1.0 + 1e-14, 3.14159, -0.001234567])
    r = round_bits(y)
    assert r[0] == r[1] and torch.allclose(r, y, rtol=2.0 ** -12) and torch.equal(round_bits(r), r)


def test_codes_shape_dtype_range(a24, wavs):
    clip = a24.load(str(wavs[1]))
    codes = a24.encode_batch([clip])[0]
    assert codes.codes.dtype == np.int64
    assert codes.codes.shape == (a24.num_codebooks, clip.record["frames"]) == (4, 128)
    assert codes.codes.min() >= 0 and codes.codes.max() < a24.codebook_size == 1024
    assert codes.side_info == {"scales": None}
    assert (a24.sample_rate, a24.channels, a24.samples_per_frame, a24.frame_rate) == (24000, 1, 320, 75.0)


@pytest.mark.parametrize("model,table", [
    ("tiny-24k", {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}),
    ("tiny-48k", {3.0: 2, 6.0: 4, 12.0: 8, 24.0: 16}),
])
def test_bandwidth_selects_codebooks_and_unsupported_is_refused(model, table, wavs):
    for bw, k in table.items():
        a = _adapter(model=model, bandwidth=bw)
        assert a.num_codebooks == k
    assert a.encode_batch([a.load(str(wavs[0]))])[0].codes.shape[0] == k  # the last (largest) one
    with pytest.raises(ValueError, match=r"bandwidth=1\.5 is not supported.*\[3\.0, 6\.0, 12\.0, 24\.0\]" if
                       model == "tiny-48k" else r"bandwidth=2\.0 is not supported"):
        _adapter(model=model, bandwidth=1.5 if model == "tiny-48k" else 2.0)


def test_full_presets_use_the_published_architecture():
    from transformers import EncodecConfig

    c24, c48 = EncodecConfig(**PRESET_CONFIGS["full-24k"]), EncodecConfig(**PRESET_CONFIGS["full-48k"])
    assert (c24.sampling_rate, c24.audio_channels, c24.frame_rate, c24.num_quantizers) == (24000, 1, 75, 32)
    assert (c24.num_filters, c24.hidden_size, c24.chunk_length_s, c24.normalize) == (32, 128, None, False)
    assert (c48.sampling_rate, c48.audio_channels, c48.frame_rate, c48.num_quantizers) == (48000, 2, 150, 16)
    assert (c48.chunk_length, c48.chunk_stride, c48.normalize, c48.norm_type) == (48000, 47520, True, "time_group_norm")
    # tiny presets keep the real hop so frame rates match the real models
    assert EncodecConfig(**PRESET_CONFIGS["tiny-24k"]).hop_length == EncodecConfig(**PRESET_CONFIGS["tiny-48k"]).hop_length == 320


@pytest.mark.parametrize("model,bw", [("tiny-24k", 1.5), ("tiny-24k", 24.0), ("tiny-48k", 3.0), ("tiny-48k", 24.0)])
def test_sizes_from_the_config_match_the_built_model_and_the_weights_wait_for_first_use(model, bw, wavs):
    """A loader or a driver that only needs sizes never builds weights; once built, the model agrees
    with the sizes taken from its config, and lazy building gives the same codes as building first."""
    a = _adapter(model=model, bandwidth=bw, max_seconds=1.0)
    clip = a.load(str(wavs[0]))
    assert a._model is None  # identity, sizes and load() needed no weights
    q = a.model.quantizer
    assert a.num_codebooks == q.get_num_quantizers_for_bandwidth(bw) and a.codebook_size == q.codebook_size
    b = _adapter(model=model, bandwidth=bw, max_seconds=1.0)
    b.model  # built before anything else ran
    assert np.array_equal(a.encode_batch([clip])[0].codes, b.encode_batch([clip])[0].codes)


@pytest.mark.parametrize("model,bw", [("tiny-24k", 3.0), ("tiny-48k", 6.0)])
def test_identity_equals_declared_identity(model, bw, a24, a48):
    a = a24 if model == "tiny-24k" else a48
    ident = a.identity()
    assert set(ident) == {"kind", "model", "sample_rate", "channels", "bandwidth", "num_codebooks",
                          "codebook_size", "serialization"}
    declared = AudioConfig(model=model, bandwidth=bw, sample_rate=a.sample_rate, channels=a.channels,
                           num_codebooks=a.num_codebooks, codebook_size=a.codebook_size)
    assert ident == declared_identity("audio", declared)
    assert ident["model"].startswith(f"{model}@sha256:") and ident["serialization"] == AUDIO_SERIALIZATION
    assert isinstance(ident["bandwidth"], float)


# ------------------------------------------------------------------ batching

def test_batch_equals_single_clip_encoding(a24, a48, wavs):
    for a in (a24, a48):
        clips = [a.load(str(p)) for p in wavs[:5]]
        # a shorter clip in the middle: a different length group
        clips.insert(2, a.prepare(clips[0].wav[:, : a.sample_rate // 2], a.sample_rate, "short"))
        batched = a.encode_batch(clips)
        for clip, b in zip(clips, batched):
            single = a.encode_batch([clip])[0]
            assert np.array_equal(b.codes, single.codes)
            assert b.side_info == single.side_info
        assert batched[2].codes.shape[1] < batched[0].codes.shape[1]


def test_length_grouped_mode_keeps_shapes_and_is_repeatable(wavs):
    a = build_audio_adapter(AudioConfig(model="tiny-24k", bandwidth=3.0), CPU, batch_invariant=False)
    assert a.batch_invariant is False
    clips = [a.load(str(p)) for p in wavs[:3]]
    clips.append(a.prepare(clips[0].wav[:, :4000], a.sample_rate, "short"))
    one, two = a.encode_batch(clips), a.encode_batch(clips)
    assert [c.codes.shape for c in one] == [(4, 128)] * 3 + [(4, 13)]
    assert all(np.array_equal(x.codes, y.codes) for x, y in zip(one, two))


# ------------------------------------------------------------------ decode and parity

def test_24k_round_trip_shape_rate_channels(a24, wavs):
    clip = a24.load(str(wavs[2]))
    wav = a24.decode(a24.encode_batch([clip])[0])
    assert wav.dtype == np.float32 and wav.shape == (1, clip.record["frames"] * 320) == clip.wav.shape
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0


def test_48k_stereo_scales_are_stored_and_used_in_decode(a48, wavs):
    clip = a48.load(str(wavs[3]))  # 1.707 s -> chunks at 0 and 0.99 s
    codes = a48.encode_batch([clip])[0]
    scales = codes.side_info["scales"]
    assert json.loads(json.dumps(codes.side_info)) == codes.side_info
    assert len(scales) == 2 and all(isinstance(s, float) and s > 0 for s in scales)
    assert codes.codes.shape == (4, 150 + 108) and clip.record["frames"] == 256
    wav = a48.decode(codes)
    assert wav.dtype == np.float32 and wav.shape == (2, 256 * 320) == clip.wav.shape
    doubled = a48.decode(AudioCodes(codes.codes, {"scales": [2 * s for s in scales]}))
    np.testing.assert_allclose(doubled, 2 * wav, rtol=1e-5, atol=1e-7)


def test_codes_and_decode_match_transformers_encode(a24, a48, wavs):
    for a in (a24, a48):
        clip = a.load(str(wavs[4]))
        mine = a.encode_batch([clip])[0]
        with torch.no_grad():
            enc = a.model.encode(torch.from_numpy(clip.wav)[None], bandwidth=a.bandwidth)
            parts = list(enc.audio_codes[:, 0])
            if enc.last_frame_pad_length:
                parts[-1] = parts[-1][..., : -enc.last_frame_pad_length]
            ref = torch.cat(parts, dim=-1).numpy()
            dec = a.model.decode(enc.audio_codes, enc.audio_scales,
                                 last_frame_pad_length=enc.last_frame_pad_length).audio_values[0].numpy()
        assert np.array_equal(mine.codes, ref)
        if a.chunk_length:
            assert mine.side_info["scales"] == [float(s) for s in enc.audio_scales]
        np.testing.assert_allclose(a.decode(mine), dec[:, : clip.wav.shape[1]], atol=1e-5)


def test_48k_code_length_is_invertible(a48):
    for frames in (1, 100, 148, 149, 150, 151, 300, 451):
        assert a48.clip_frames(a48.code_frames(frames)) == frames
    assert a48.code_frames(300) == 303  # 2 s: chunks of 150 + 150 + 3 code frames
    with pytest.raises(ValueError, match="not a valid length"):
        a48.clip_frames(149)


# ------------------------------------------------------------------ normalization

def test_real_48k_float_wav_is_resampled_and_recorded(a24, wavs):
    path = wavs[0]
    src, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert (rate, src.shape[1], sf.info(str(path)).subtype) == (48000, 2, "FLOAT")
    clip = a24.load(str(path))
    r = clip.record
    assert (r["orig_rate"], r["orig_channels"], r["channel_op"], r["resampled"]) == (48000, 2, "mix_to_mono", True)
    assert r["orig_seconds"] == pytest.approx(81920 / 48000) and r["kept_fraction"] == 1.0
    assert clip.wav.dtype == np.float32 and clip.wav.shape == (1, r["frames"] * 320)
    # 1.7067 s at 24 kHz = 40960 samples = exactly 128 frames, so no padding
    assert r["frames"] == 128 and r["padded_seconds"] == 0.0 and r["seconds"] == pytest.approx(40960 / 24000)
    expect = soxr.resample(src.mean(axis=1), 48000, 24000, quality="HQ")
    np.testing.assert_allclose(clip.wav[0], expect[:40960], atol=1e-6)


def test_clip_to_max_and_pad_to_next_frame_boundary(wavs):
    a = _adapter(model="tiny-24k", bandwidth=1.5, max_seconds=1.0)
    long = a.load(str(wavs[0]))
    assert long.wav.shape == (1, 24000) and long.record["frames"] == 75
    assert long.record["kept_fraction"] == pytest.approx(1.0 / (81920 / 48000), abs=1e-5)
    short = a.prepare(np.ones(1500, np.float32) * 0.1, 24000, "short")  # 4.69 frames -> 5 frames
    assert short.wav.shape == (1, 1600) and short.record["padded_seconds"] == pytest.approx(100 / 24000, abs=1e-6)
    assert np.all(short.wav[0, 1500:] == 0) and np.all(short.wav[0, :1500] == np.float32(0.1))
    assert short.record["resampled"] is False


def test_channel_policies(wavs):
    stereo = np.stack([np.full(4800, 0.2, np.float32), np.full(4800, -0.4, np.float32)])
    first = _adapter(model="tiny-24k", channel_policy="first").prepare(stereo, 24000)
    assert first.record["channel_op"] == "first_1" and np.allclose(first.wav[0, :4800], 0.2)
    mix = _adapter(model="tiny-24k", channel_policy="mix").prepare(stereo, 24000)
    assert mix.record["channel_op"] == "mix_to_mono" and np.allclose(mix.wav[0, :4800], -0.1)
    up = _adapter(model="tiny-48k", bandwidth=3.0).prepare(stereo[0], 48000)
    assert up.record["channel_op"] == "dup_mono" and up.wav.shape[0] == 2 and np.array_equal(up.wav[0], up.wav[1])


def test_flac_and_ogg_are_read(a24, tmp_path):
    t = np.arange(16000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for ext in ("flac", "ogg"):
        p = tmp_path / f"tone.{ext}"
        sf.write(str(p), x, 16000)
        clip = a24.load(str(p))
        assert clip.record["orig_rate"] == 16000 and clip.record["resampled"] is True
        assert clip.wav.shape == (1, 75 * 320)


# ------------------------------------------------------------------ bad media

def test_bad_media_errors_name_file_and_reason(a24, wavs, tmp_path):
    cases = {}
    cases["file not found"] = tmp_path / "missing.wav"
    text = tmp_path / "notes.wav"
    text.write_text("this is a text file, not audio\n" * 10)
    cases["not a readable audio file"] = text
    data = wavs[0].read_bytes()
    trunc = tmp_path / "truncated.wav"
    trunc.write_bytes(data[: len(data) // 2])
    cases["truncated audio file"] = trunc
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0, 2), np.float32), 48000, subtype="FLOAT")
    cases["empty audio file"] = empty
    tiny = tmp_path / "tiny.wav"
    sf.write(str(tiny), np.zeros(480, np.float32), 48000, subtype="FLOAT")  # 0.01 s
    cases["too short"] = tiny
    for reason, path in cases.items():
        with pytest.raises(MediaError) as e:
            a24.load(str(path))
        assert e.value.path == str(path) and reason in e.value.reason and str(path) in str(e.value)


def test_strict_channel_policy_refuses_a_mismatch(wavs):
    a = _adapter(model="tiny-24k", channel_policy="strict")
    with pytest.raises(MediaError, match=r"2 channel\(s\) but the codec takes 1.*channel_policy='strict'") as e:
        a.load(str(wavs[0]))
    assert e.value.path == str(wavs[0])
    assert a.prepare(np.zeros(2400, np.float32), 24000).record["channel_op"] == "none"  # a match passes
    with pytest.raises(MediaError, match="empty audio"):
        a.prepare(np.zeros((1, 0), np.float32), 24000, "arr")


def test_encode_refuses_unnormalized_arrays(a24):
    with pytest.raises(ValueError, match="expected float32"):
        a24.encode_batch([AudioClip(wav=np.zeros((1, 1000), np.float32))])
