"""`lumo codec train-vq` (Ray Train, one CPU worker): a few steps on a few images through the real
CLI, deterministic for a seed (two runs -> byte-identical weights), metrics.json with PSNR / SSIM."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lumo_ray.cli import main

QUICK = ["--set", "codec.steps=6", "--set", "codec.batch=8", "--set", "codec.synth_images=16",
         "--set", "codec.procedural_images=8", "--set", "codec.eval_images=4", "--set", "codec.max_real_images=2",
         "--set", "codec.log_every=3", "--set", "codec.restart_every=3", "--set", "codec.warmup_steps=2"]


def _train(out: Path, real: Path, *extra: str) -> dict:
    rc = main(["codec", "train-vq", "--out", str(out), "--set", f"codec.real_data={real}", *QUICK, *extra])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def two_runs(ray_local, real_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("codec")
    return [(_train(root / n, real_data), root / n) for n in ("a", "b")]


def test_train_vq_writes_weights_and_metrics(two_runs):
    m, out = two_runs[0]
    w = out / "model.safetensors"
    assert w.is_file() and (out / "config.yaml").is_file()
    assert m["weights_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    for k in ("synth_psnr", "synth_ssim", "real_psnr", "real_ssim"):
        assert isinstance(m[k], float), k
    assert m["steps"] == 6 and m["synth_n"] == 4 and m["real_n"] == 2
    assert m["init"]["synth_psnr"] < m["synth_psnr"]  # a few steps already train the random decoder
    # run tracking: the reported steps as TensorBoard scalars, read back with TensorBoard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("loss")] == [3, 6]
    # the weights load into the preset architecture as a local VQ model
    from lumo_ray.codecs import image_vq

    model = image_vq.tiny_init(0)
    image_vq.load_weights(model, w)


def test_train_vq_is_deterministic_for_a_seed(two_runs):
    (a, ra), (b, rb) = two_runs
    assert a["weights_sha256"] == b["weights_sha256"]
    assert (ra / "model.safetensors").read_bytes() == (rb / "model.safetensors").read_bytes()
    assert a["synth_psnr"] == b["synth_psnr"] and a["history"] == b["history"]
    assert a["code_restarts"] == b["code_restarts"]
