"""The tiny CLIP preset's shipped trained weights: they are what their meta says, they embed near copies
(resized, JPEG, shifted) of held-out images together and distinct images (also a scene and the same
scene in another shape) apart where the random init does not, and `lumo codec train-clip` gives byte-identical weights in two processes."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from lumo_ray.codecs.clip import ASSET_DIR, WEIGHTS, tiny_clip
from lumo_ray.embed.clip_train import near_duplicate_eval


def test_shipped_weights_are_the_ones_their_meta_describes():
    meta = json.loads((ASSET_DIR / "meta.json").read_text())
    data = (ASSET_DIR / WEIGHTS).read_bytes()
    assert hashlib.sha256(data).hexdigest() == meta["weights_sha256"] and len(data) == meta["bytes"]
    assert meta["command"].startswith("lumo codec train-clip")
    assert tiny_clip(0).identity() != tiny_clip(0, trained=False).identity()


def _passes(ev: dict) -> bool:
    return (min(ev["resize_recall"], ev["jpeg_recall"], ev["shift_recall"], ev["precision"]) >= 0.95
            and ev["shape_siblings_above"] <= 0.05)


def test_trained_preset_finds_near_copies_and_the_random_init_does_not():
    trained = near_duplicate_eval(tiny_clip(0), n=150, copies=30)
    untrained = near_duplicate_eval(tiny_clip(0, trained=False), n=150, copies=30)
    assert _passes(trained), trained
    assert not _passes(untrained), untrained  # everything looks alike to it


def test_train_clip_gives_the_same_bytes_in_two_processes(tmp_path):
    def run(out):
        subprocess.run([sys.executable, "-m", "lumo_ray.cli", "codec", "train-clip", "--out", str(out), "--steps", "3",
                        "--batch", "8"], check=True, capture_output=True, text=True)
        return (out / WEIGHTS).read_bytes()

    assert run(tmp_path / "a") == run(tmp_path / "b")
