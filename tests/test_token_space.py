"""Token space (SPEC §3): layout, identity hash, lookups, audio serialization and phase, mismatch refusal."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.token_space import Range, TokenSpace, TokenSpaceError, TokenSpaceMismatch
from lumo_ray.uti import build_token_space

REPO = Path(__file__).resolve().parents[1]
REF = REPO / "configs" / "reference" / "lumoomni.yaml"


def ref_space(*overrides):
    return build_token_space(load_config(LumoConfig, REF, list(overrides)).uti)


def test_reference_layout_matches_spec():
    ts = ref_space()
    got = {r.name: (r.start, r.end) for r in ts.ranges}
    assert got == {"TEXT": (0, 151668), "SPECIAL": (151669, 151732), "IMAGE": (151733, 159924),
                   "AUDIO_CB0": (159925, 160948), "AUDIO_CB1": (160949, 161972),
                   "AUDIO_CB2": (161973, 162996), "AUDIO_CB3": (162997, 164020)}
    assert ts.total == 164021
    assert ts.padded_size == 164032 and ts.padded_size % 64 == 0
    assert [ts.special_id(n) for n in ts.specials[:3]] == [151669, 151670, 151671]
    assert ts.special_id("<|pad_mm|>") == 151678


def test_lookups_and_image_mapping():
    ts = ref_space()
    assert ts.modality_of(0) == "text" and ts.modality_of(151668) == "text"
    assert ts.modality_of(151669) == "special"
    assert ts.modality_of(151733) == "image" and ts.modality_of(159924) == "image"
    assert ts.modality_of(159925) == "audio" and ts.modality_of(164020) == "audio"
    with pytest.raises(TokenSpaceError, match="padded embedding row"):
        ts.modality_of(164021)
    with pytest.raises(TokenSpaceError):
        ts.modality_of(-1)
    codes = np.array([0, 1, 8191])
    g = ts.image_to_global(codes)
    assert g.tolist() == [151733, 151734, 159924]
    assert ts.global_to_image(g).tolist() == codes.tolist()
    with pytest.raises(TokenSpaceError):
        ts.image_to_global([8192])
    with pytest.raises(TokenSpaceError, match="not an IMAGE id"):
        ts.global_to_image([5])
    assert ts.audio_code_to_global(2, 5).item() == 161973 + 5


def test_audio_serialization_interleaves_by_time_and_checks_phase():
    ts = ref_space()
    codes = np.array([[1, 2, 3], [10, 20, 30], [100, 200, 300], [7, 8, 9]])  # K=4, T=3
    flat = ts.audio_to_global(codes)
    starts = [r.start for r in ts.audio_ranges]
    assert flat[:4].tolist() == [starts[0] + 1, starts[1] + 10, starts[2] + 100, starts[3] + 7]
    assert flat[4] == starts[0] + 2
    assert ts.audio_phase_errors(flat) == []
    assert np.array_equal(ts.global_to_audio(flat), codes)
    shifted = flat[1:]  # drop one token: every position is now out of phase
    assert ts.audio_phase_errors(shifted)[0] == 0
    with pytest.raises(TokenSpaceError, match="phase"):
        ts.global_to_audio(np.concatenate([flat[1:], flat[:1]]))
    with pytest.raises(TokenSpaceError, match="shape"):
        ts.audio_to_global(codes[:3])


def test_hash_identity_only_and_sensitive_to_layout():
    a = ref_space()
    assert a.hash == ref_space("uti.runtime.device=cuda", "uti.runtime.dtype=bfloat16").hash
    assert a.hash != ref_space("uti.token_space.specials=[<|text_end|>,<|text_start|>,<|img_start|>]").hash
    reordered = list(a.specials)
    reordered[0], reordered[1] = reordered[1], reordered[0]
    b = TokenSpace(a.ranges, reordered, a.special_slots, a.adapters, a.pad_multiple)
    assert a.hash != b.hash
    c = ref_space("uti.audio.codebook_size=2048")
    assert c.hash != a.hash and c.range("AUDIO_CB0").size == 2048


def test_mismatch_error_names_both_hashes_and_first_field():
    a = ref_space()
    c = ref_space("uti.audio.codebook_size=2048")
    with pytest.raises(TokenSpaceMismatch) as e:
        a.ensure_same(c)
    msg = str(e.value)
    assert a.hash in msg and c.hash in msg and "adapters.audio.codebook_size" in msg
    reordered = list(a.specials)
    reordered[2], reordered[3] = reordered[3], reordered[2]
    b = TokenSpace(a.ranges, reordered, a.special_slots, a.adapters, a.pad_multiple)
    with pytest.raises(TokenSpaceMismatch, match=r"specials\[2\]"):
        a.ensure_same(b)
    a.ensure_same(ref_space())


def test_save_load_roundtrip_and_tamper_detection(tmp_path):
    a = ref_space()
    a.save(tmp_path)
    assert (tmp_path / "token_space.sha256").read_text().strip() == a.hash
    assert TokenSpace.load(tmp_path).hash == a.hash
    d = json.loads((tmp_path / "token_space.json").read_text())
    d["specials"][0], d["specials"][1] = d["specials"][1], d["specials"][0]
    (tmp_path / "token_space.json").write_text(json.dumps(d))
    with pytest.raises(TokenSpaceError, match="content hashes to"):
        TokenSpace.load(tmp_path)


def test_validation_refuses_bad_layouts():
    a = ref_space()
    r = list(a.ranges)
    with pytest.raises(TokenSpaceError, match="contiguous"):
        TokenSpace(r[:2] + [Range("IMAGE", r[2].start + 1, 8192)] + r[3:], a.specials, 64, a.adapters)
    with pytest.raises(TokenSpaceError, match="codebook_size"):
        TokenSpace(r[:2] + [Range("IMAGE", r[2].start, 4096)] + [Range(x.name, x.start - 4096, x.size) for x in r[3:]],
                   a.specials, 64, a.adapters)
    with pytest.raises(TokenSpaceError, match="exceed"):
        TokenSpace(r, [f"<s{i}>" for i in range(65)], 64, a.adapters)
    with pytest.raises(TokenSpaceError, match="duplicate"):
        TokenSpace(r, ["<a>", "<a>"], 64, a.adapters)


def test_declared_sizes_required_without_weights():
    with pytest.raises(TokenSpaceError, match="audio.num_codebooks must be declared"):
        ref_space("uti.audio.num_codebooks=null")


def _cli_build(cwd: Path, out: Path, *extra: str) -> str:
    subprocess.run([sys.executable, "-m", "lumo_ray.cli", "uti", "build", "--config", str(REF), "--out", str(out), *extra],
                   cwd=cwd, check=True, capture_output=True, text=True)
    return (out / "token_space.sha256").read_text().strip()


def test_cli_build_hash_identical_across_working_dirs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deep").mkdir(parents=True)
    h1 = _cli_build(tmp_path / "a", tmp_path / "a" / "out1")
    h2 = _cli_build(tmp_path / "b" / "deep", tmp_path / "elsewhere" / "x", "--set", "uti.runtime.device=cuda:3")
    assert h1 == h2 == ref_space().hash
    ts = json.loads((tmp_path / "a" / "out1" / "token_space.json").read_text())
    assert ts["total"] == 164021
    assert str(tmp_path) not in json.dumps(ts)
    assert (tmp_path / "a" / "out1" / "config.yaml").exists()


def test_seed_real_weights_identity_is_a_content_digest(tmp_path):
    from lumo_ray.codecs.base import image_model_identity
    from lumo_ray.config import ImageConfig

    def weights(d, payload):
        d.mkdir()
        (d / "q.pt").write_bytes(payload)
        (d / "eva.pth").write_bytes(b"eva")
        return {"quantizer": str(d / "q.pt"), "eva_clip": str(d / "eva.pth"), "unclip": str(d)}

    a = ImageConfig(kind="seed", model="real", seed_weights=weights(tmp_path / "a", b"one"))
    b = ImageConfig(kind="seed", model="real", seed_weights=weights(tmp_path / "b", b"one"))
    c = ImageConfig(kind="seed", model="real", seed_weights=weights(tmp_path / "c", b"two"))
    assert image_model_identity(a) == image_model_identity(b) != image_model_identity(c)
    assert str(tmp_path) not in image_model_identity(a)


def test_tiny_vq_identity_is_the_weights_digest_and_one_weight_changes_the_hash(tmp_path, monkeypatch):
    """The trained tiny VQ preset is named by the sha256 of its shipped weights: a copy with one
    weight changed is another token space (and the untrained init of another seed is another one)."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    from lumo_ray.codecs import base

    sets = ["uti.image.kind=vq", "uti.image.model=tiny", "uti.image.resolution=32", "uti.image.seed=0",
            "uti.image.codebook_size=256", "uti.image.tokens_per_image=64"]
    a = ref_space(*sets)
    digest = hashlib.sha256(base.TINY_VQ_WEIGHTS.read_bytes()).hexdigest()
    assert a.adapters["image"]["model"] == f"tiny@sha256:{digest}"
    assert ref_space(*sets).hash == a.hash
    sd = load_file(str(base.TINY_VQ_WEIGHTS))
    key = sorted(sd)[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] += torch.tensor(1e-3, dtype=sd[key].dtype)
    save_file(sd, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(base, "TINY_VQ_WEIGHTS", tmp_path / "model.safetensors")
    b = ref_space(*sets)
    assert b.adapters["image"]["model"].startswith("tiny@sha256:") and b.hash != a.hash
    monkeypatch.undo()
    c = ref_space(*sets[:3], "uti.image.seed=1", *sets[4:])
    assert c.adapters["image"]["model"].startswith("tiny-init@sha256:") and c.hash != a.hash


def test_every_preset_identity_is_a_weights_digest_and_one_changed_weight_is_refused():
    """Presets (the random-init audio codec, an untrained VQ init, the bundled tokenizer) are named by
    what they encode with, so changing how one initialises changes the hash; the refusal names the adapter."""
    import torch

    from lumo_ray.uti import build_adapters

    # random-init tiny audio (seed 1; seed 0 is the shipped fitted preset, named by its file's digest:
    # tests/test_audio_codec_trained.py), untrained tiny VQ, tiny text
    cfg = load_config(LumoConfig, None, ["uti.image.seed=1", "uti.audio.seed=1"]).uti
    adapters = build_adapters(cfg)
    a = build_token_space(cfg, adapters)
    assert a.adapters["audio"]["model"].startswith("tiny-24k@sha256:")
    assert a.adapters["image"]["model"].startswith("tiny-init@sha256:")
    assert a.adapters["text"]["name"].startswith("tiny@sha256:")
    assert build_token_space(cfg).hash == a.hash  # the declared path builds a preset to name it the same way
    for which in ("audio", "image"):
        model = getattr(adapters, which).model
        p = next(iter(model.parameters()))
        orig = p.detach().clone()
        with torch.no_grad():
            p.view(-1)[0] += 1e-3
        b = build_token_space(cfg, adapters)
        assert b.hash != a.hash
        with pytest.raises(TokenSpaceMismatch, match=f"first differing field: adapters.{which}.model"):
            a.ensure_same(b)
        with torch.no_grad():
            p.copy_(orig)
    assert build_token_space(cfg, adapters).hash == a.hash
