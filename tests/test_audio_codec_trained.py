"""The fitted tiny EnCodec preset ('tiny-24k', seed 0, shipped weights): its reconstructions of synthetic
beeps pass the waveform probe (count, length, pitch >= 0.95) and the audit's floors while the random
init fails them; `lumo codec train-audio` (Ray Train, one CPU worker) is deterministic; the preset's
token-space identity is the weights file's digest."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lumo_ray.codecs import audio, base
from lumo_ray.codecs.audio import build_audio_adapter
from lumo_ray.config import AudioConfig, RuntimeConfig
from lumo_ray.data.synth import synthetic_beeps
from lumo_ray.eval import beep_probe
from lumo_ray.eval.audit import (TINY_AUDIO_LOG_MEL_CEILING, TINY_AUDIO_PROBE_FLOOR, TINY_AUDIO_SNR_FLOOR,
                                 tiny_audio_floor_check)

REPO = Path(__file__).resolve().parents[1]
CPU = RuntimeConfig(device="cpu")
N = 16  # held-out synthetic clips (seed 2000: the audit's; the fit draws seed 1000)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clips() -> tuple[np.ndarray, list[dict]]:
    return synthetic_beeps(N, 2000)


def _adapter(seed: int = 0, bandwidth: float = 1.5):
    return build_audio_adapter(AudioConfig(model="tiny-24k", bandwidth=bandwidth, seed=seed, fitted=True), CPU,
                               batch_invariant=True)


def test_probe_reads_the_real_clips(clips):
    """The probe is defined on real (not reconstructed) clips, and reads them all."""
    wavs, truths = clips
    assert beep_probe.accuracy([beep_probe.read_beeps(w) for w in wavs], truths) == {
        "count": 1.0, "length": 1.0, "pitch": 1.0}
    # a 48 kHz stereo copy reads the same (resampled and mixed like the audit's aligned signals)
    r = beep_probe.read_beeps(np.stack([np.repeat(wavs[0], 2)] * 2), rate=48000)
    assert {k: r[k] for k in ("count", "length", "pitch")} == truths[0]


@pytest.mark.parametrize("bandwidth", [1.5, 3.0])
def test_shipped_preset_reconstructions_pass_the_probe_and_floors(clips, bandwidth):
    a = _adapter(bandwidth=bandwidth)
    fl = tiny_audio_floor_check(a, n=N)
    assert fl["probe_pass"] and fl["snr_pass"] and fl["log_mel_pass"], fl
    assert all(v >= TINY_AUDIO_PROBE_FLOOR for v in fl["probe"].values())
    assert fl["snr_db"] >= TINY_AUDIO_SNR_FLOOR and fl["log_mel_l1"] <= TINY_AUDIO_LOG_MEL_CEILING
    # audible: the decoded clips have the loudness of the input (the random init's hiss had RMS 0.008)
    wavs, _ = clips
    rms_in = float(np.sqrt((wavs[:4] ** 2).mean()))
    dec = np.stack([a.decode(c)[0] for c in a.encode_batch([a.prepare(w, 24000) for w in wavs[:4]])])
    assert 0.8 * rms_in <= float(np.sqrt((dec ** 2).mean())) <= 1.2 * rms_in


@pytest.mark.parametrize("which", ["init of seed 0 (training's start)", "random preset of seed 1"])
def test_random_init_fails_the_probe_and_floors(which):
    a = _adapter(seed=1)
    if which.startswith("init"):
        a._model = audio.tiny_init(0).eval()
    fl = tiny_audio_floor_check(a, n=N)
    assert not fl["probe_pass"] and not fl["snr_pass"] and not fl["log_mel_pass"], fl
    assert all(v < TINY_AUDIO_PROBE_FLOOR for v in fl["probe"].values()), fl["probe"]


def test_committed_wav_is_three_short_high_beeps():
    """docs/audio_three_high_beeps.wav: a synthetic 'three short high beeps' clip through the codec."""
    wav, rate = sf.read(str(REPO / "docs" / "audio_three_high_beeps.wav"), dtype="float32")
    r = beep_probe.read_beeps(wav, rate)
    assert (r["count"], r["length"], r["pitch"]) == (3, "short", "high") and float(np.sqrt((wav ** 2).mean())) > 0.1


# ------------------------------------------------------------------ `lumo codec train-audio`

QUICK = ["--set", "codec_audio.synth_clips=8", "--set", "codec_audio.procedural_clips=4",
         "--set", "codec_audio.kmeans_iters=1", "--set", "codec_audio.deep_kmeans_iters=1",
         "--set", "codec_audio.deep_max_frames=1024", "--set", "codec_audio.eval_clips=4",
         "--set", "codec_audio.max_real_clips=1", "--set", "codec_audio.bandwidths=[1.5]"]


@pytest.fixture(scope="module")
def two_runs(ray_local, real_data, tmp_path_factory):
    """The CLI (Ray Train worker), then the library function that worker runs, in this process, with the
    config the CLI wrote: the same config must give the same bytes."""
    from lumo_ray.cli import main
    from lumo_ray.codecs.audio_train import train_tiny_audio
    from lumo_ray.config import LumoConfig, load_config

    root = tmp_path_factory.mktemp("codec_audio")
    assert main(["codec", "train-audio", "--out", str(root / "a"), "--set", f"codec_audio.real_data={real_data}",
                 *QUICK]) == 0
    cfg = load_config(LumoConfig, root / "a" / "config.yaml")
    train_tiny_audio(cfg.codec_audio, log=lambda s: None, out_dir=root / "b")
    return [(json.loads((root / n / "metrics.json").read_text()), root / n) for n in ("a", "b")]


def test_train_audio_writes_weights_and_metrics_and_is_deterministic(two_runs):
    (a, ra), (b, rb) = two_runs
    w = ra / "model.safetensors"
    assert (ra / "config.yaml").is_file() and a["weights_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    assert w.read_bytes() == (rb / "model.safetensors").read_bytes()  # same config: same bytes
    assert a["weights_sha256"] == b["weights_sha256"] and a["bw1.5"] == b["bw1.5"]
    assert a["bw1.5"]["n"] == 4 and a["bw1.5"]["real_n"] == 1
    assert set(a["bw1.5"]["probe"]) == {"count", "length", "pitch"}
    assert a["init"]["bw1.5"]["snr_db"] < a["bw1.5"]["snr_db"]  # even a quick fit beats the random init
    model = audio.tiny_init(0)
    audio.load_weights(model, w)  # the weights load into the preset architecture
    # run tracking: the reported evaluation as TensorBoard scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(ra / "tensorboard"))
    ev.Reload()
    assert "snr_db" in ev.Tags()["scalars"] and "probe_pitch" in ev.Tags()["scalars"]


def test_identity_is_the_weights_digest_and_changes_with_them(two_runs, monkeypatch, tmp_path):
    from lumo_ray.config import UTIConfig
    from lumo_ray.integrity import write_manifest
    from lumo_ray.uti import declared_identity, load_token_space

    shipped = _adapter().identity()
    assert shipped["model"] == "tiny-24k@sha256:" + hashlib.sha256(base.TINY_AUDIO_WEIGHTS.read_bytes()).hexdigest()
    assert (shipped["num_codebooks"], shipped["codebook_size"], shipped["sample_rate"]) == (2, 1024, 24000)
    assert declared_identity("audio", AudioConfig(model="tiny-24k", bandwidth=1.5, fitted=True)) == shipped
    assert _adapter(seed=0).identity() != build_audio_adapter(AudioConfig(model="tiny-24k"), CPU).identity()  # opt-in
    wav = synthetic_beeps(1, 2000)[0][0]
    a = _adapter()
    codes = a.encode_batch([a.prepare(wav, 24000)])[0].codes
    fitted = UTIConfig()
    fitted.audio.fitted = True
    ts_hash = load_token_space(fitted).hash
    (m, run), _ = two_runs
    other_dir = tmp_path / "preset"  # other weights, same architecture, a verifiable preset folder
    other_dir.mkdir()
    shutil.copy(run / "model.safetensors", other_dir / "model.safetensors")
    write_manifest(other_dir)
    monkeypatch.setattr(base, "TINY_AUDIO_WEIGHTS", other_dir / "model.safetensors")
    other = _adapter()
    assert other.identity()["model"] == f"tiny-24k@sha256:{m['weights_sha256']}" != shipped["model"]
    assert load_token_space(fitted).hash != ts_hash
    assert not np.array_equal(other.encode_batch([other.prepare(wav, 24000)])[0].codes, codes)


def test_shipped_preset_verifies_its_digests_and_a_changed_byte_is_refused(tmp_path, monkeypatch):
    from lumo_ray.integrity import IntegrityError, verify

    verify(base.TINY_AUDIO_WEIGHTS.parent, "shipped audio preset")
    copy = shutil.copytree(base.TINY_AUDIO_WEIGHTS.parent, tmp_path / "encodec_tiny24k")
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-5] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(base, "TINY_AUDIO_WEIGHTS", copy / "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors.*does not match SHA256SUMS"):
        _adapter().model
