"""`lumo uti audit` (SPEC §6): passes on the tiny preset (with the trained tiny VQ codec's reconstruction
floors), fails against a baseline that claims better quality or with a doctored decoder."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lumo_ray.eval.audit import (RULES, TINY_VQ_PSNR_FLOOR, TINY_VQ_SSIM_FLOOR, compare_to_baseline,
                                  tiny_vq_floor_check)


def audit(out: Path, real: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lumo_ray.cli", "uti", "audit", "--out", str(out),
                           "--set", f"audit.real_data={real}", *extra], capture_output=True, text=True)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, real_data):
    out = tmp_path_factory.mktemp("audit")
    p = audit(out, real_data, "--write-baseline")
    return out, p


def test_audit_passes_on_tiny_preset(baseline_run):
    out, p = baseline_run
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["pass"] and all(rep["checks"].values())
    for k in ("determinism_across_processes", "audio_phase", "audio_decode_rate_channels_length", "image_decode_size"):
        assert rep["checks"][k] is True
    assert rep["token_space_hash"] == (out / "token_space.sha256").read_text().strip()
    assert any(k.startswith("real:") for k in rep["per_input"]) and "gen:sine_sweep" in rep["per_input"]
    assert all(rep["metrics"][k] is not None for k in ("audio_snr_db", "audio_log_mel_l1", "image_psnr", "image_ssim"))
    assert (out / "recon.wav").exists() and (out / "recon.png").exists()
    # the trained tiny VQ preset is gated on synthetic reconstruction; real images are reported (no floor)
    assert rep["checks"]["image_tiny_synth_psnr_floor"] is True and rep["checks"]["image_tiny_synth_ssim_floor"] is True
    assert rep["metrics"]["image_synth_psnr"] >= TINY_VQ_PSNR_FLOOR and rep["metrics"]["image_synth_ssim"] >= TINY_VQ_SSIM_FLOOR
    assert rep["metrics"]["image_real_psnr"] is not None and rep["metrics"]["image_real_ssim"] is not None
    assert rep["details"]["image_tiny_synth"]["psnr_floor"] == 22.0 and rep["details"]["image_tiny_synth"]["ssim_floor"] == 0.70


def test_tiny_vq_floor_fails_a_doctored_decoder():
    """Beside the passing shipped weights, a zeroed or random decoder fails the floors."""
    import torch

    from lumo_ray.codecs.image_vq import build_vq_adapter
    from lumo_ray.config import ImageConfig, RuntimeConfig

    good = tiny_vq_floor_check(build_vq_adapter(ImageConfig(), RuntimeConfig()), n=8)
    assert good["psnr_pass"] and good["ssim_pass"], good
    for doctor in ("zero", "random"):
        a = build_vq_adapter(ImageConfig(), RuntimeConfig())
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in a.model.decoder.parameters():
                p.copy_(torch.zeros_like(p) if doctor == "zero" else 0.1 * torch.randn(p.shape, generator=g))
        bad = tiny_vq_floor_check(a, n=8)
        assert not bad["psnr_pass"] and bad["psnr"] < 15.0, (doctor, bad)


def test_audit_against_own_baseline_passes_and_doctored_fails(baseline_run, tmp_path, real_data):
    out, _ = baseline_run
    base = json.loads((out / "baseline.json").read_text())
    ok = audit(tmp_path / "again", real_data, "--baseline", str(out / "baseline.json"))
    assert ok.returncode == 0, ok.stdout[-2000:]
    rep = json.loads((tmp_path / "again" / "report.json").read_text())
    assert rep["checks"]["baseline_regression"] and set(rep["regression"]) == {
        "audio_snr_db", "audio_log_mel_l1", "image_psnr", "image_ssim"}
    doctored = dict(base, metrics=dict(base["metrics"], audio_snr_db=base["metrics"]["audio_snr_db"] + 3.0,
                                       image_psnr=base["metrics"]["image_psnr"] + 2.0))
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    bad = audit(tmp_path / "bad", real_data, "--baseline", str(tmp_path / "doctored.json"))
    assert bad.returncode == 1
    rep = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert not rep["pass"] and not rep["regression"]["audio_snr_db"]["pass"] and not rep["regression"]["image_psnr"]["pass"]
    assert rep["regression"]["audio_log_mel_l1"]["pass"]
    assert "FAIL" in bad.stdout


def test_regression_rules_match_spec():
    base = {"audio_snr_db": 10.0, "audio_log_mel_l1": 2.0, "image_psnr": 20.0, "image_ssim": 0.5}
    edge = {"audio_snr_db": 9.0, "audio_log_mel_l1": 2.1, "image_psnr": 19.5, "image_ssim": 0.48}
    assert all(r["pass"] for r in compare_to_baseline(edge, base).values())
    worse = {"audio_snr_db": 8.99, "audio_log_mel_l1": 2.11, "image_psnr": 19.49, "image_ssim": 0.479}
    assert not any(r["pass"] for r in compare_to_baseline(worse, base).values())


def test_audit_seed_images_and_48k_stereo_audio(tmp_path, real_data):
    """SEED decoding is reported as stochastic (seeded, repeatable; no PSNR/SSIM); 48 kHz stereo passes the audio checks."""
    p = audit(tmp_path, real_data, "--set", "uti.image.kind=seed", "--set", "uti.audio.model=tiny-48k",
              "--set", "uti.audio.bandwidth=3.0", "--set", "audit.max_real_images=2", "--set", "audit.max_real_audio=2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "stochastic" in rep["details"]["image_decode"]
    assert rep["checks"]["image_decode_repeatable_for_seed"] is True and "image_decode_repeatable" not in rep["checks"]
    assert rep["metrics"]["image_psnr"] is None and rep["metrics"]["image_ssim"] is None
    assert rep["checks"]["audio_decode_rate_channels_length"] is True
    ts = json.loads((tmp_path / "token_space.json").read_text())
    assert ts["adapters"]["audio"]["channels"] == 2 and ts["adapters"]["image"]["kind"] == "seed"


# -- gates that cannot be fooled: the committed baseline, non-finite and silent decoders, missing metrics

def _audit_cli(out: Path, *extra: str) -> tuple[int, dict]:
    """`lumo uti audit` in-process on the packaged real samples (so decoders can be doctored)."""
    from lumo_ray.cli import main
    rc = main(["uti", "audit", "--out", str(out), *extra])
    return rc, json.loads((out / "report.json").read_text())


def test_audit_applies_the_committed_baseline_by_default(tmp_path):
    from lumo_ray.eval.audit import committed_baseline
    rc, rep = _audit_cli(tmp_path / "default")
    assert rc == 0, rep["checks"]
    assert rep["baseline"] == str(committed_baseline(rep["token_space_hash"]))
    assert set(rep["regression"]) == set(RULES) and all(r["pass"] for r in rep["regression"].values())
    assert rep["checks"]["baseline_regression"] and rep["details"]["baseline"].startswith("applied: committed")
    rc, rep = _audit_cli(tmp_path / "skip", "--baseline", "none")
    assert rc == 0 and rep["baseline"] is None and rep["regression"] == {}
    assert rep["details"]["baseline"].startswith("skipped (--baseline none)")


def test_audit_fails_a_nan_audio_decoder_naming_the_input(tmp_path, monkeypatch):
    from lumo_ray.codecs.audio import EncodecAdapter
    real = EncodecAdapter.decode

    def nan_decode(self, codes):
        wav = real(self, codes)
        wav[:, ::7] = np.nan
        return wav
    monkeypatch.setattr(EncodecAdapter, "decode", nan_decode)
    rc, rep = _audit_cli(tmp_path / "nan")
    assert rc == 1 and not rep["pass"] and not rep["checks"]["finite_decodes_and_metrics"]
    assert any(x.startswith("gen:sine_sweep: decoded audio has") for x in rep["details"]["non_finite"])
    assert math.isnan(rep["metrics"]["audio_log_mel_l1"])  # not dropped from the mean
    assert not rep["regression"]["audio_log_mel_l1"]["pass"]


def test_audit_fails_a_silent_audio_and_black_image_decoder(tmp_path, monkeypatch):
    """Silence and black images are finite and well-shaped: the committed baseline is what catches them."""
    from lumo_ray.codecs.audio import EncodecAdapter
    from lumo_ray.codecs.image_vq import VQImageAdapter
    a_real, i_real = EncodecAdapter.decode, VQImageAdapter.decode
    monkeypatch.setattr(EncodecAdapter, "decode", lambda self, codes: np.zeros_like(a_real(self, codes)))
    monkeypatch.setattr(VQImageAdapter, "decode", lambda self, codes, seed=0: np.zeros_like(i_real(self, codes, seed)))
    rc, rep = _audit_cli(tmp_path / "silent")
    assert rc == 1 and not rep["checks"]["baseline_regression"]
    assert not rep["regression"]["audio_log_mel_l1"]["pass"] and not rep["regression"]["image_psnr"]["pass"]


def test_a_metric_the_baseline_has_and_the_run_lacks_fails():
    base = {"audio_snr_db": 10.0, "audio_log_mel_l1": 2.0, "image_psnr": 20.0, "image_ssim": 0.5}
    res = compare_to_baseline({"audio_snr_db": 10.0, "audio_log_mel_l1": 2.0, "image_ssim": 0.5}, base)
    assert not res["image_psnr"]["pass"] and res["image_psnr"]["rule"] == "missing in this run"
    assert not compare_to_baseline(dict(base, image_psnr=float("nan")), base)["image_psnr"]["pass"]
    assert compare_to_baseline(base, {"image_psnr": 20.0}).keys() == {"image_psnr"}  # baseline lacks: skipped
