"""VQ-GAN image adapter (diffusers.VQModel): preprocessing, codes, decode, identity, bad inputs, the
tiny preset's shipped trained weights (reconstruction, identity = weights digest, packaging) and its
data-dependent init (the training starting point: local, colour-faithful codes; a deterministic fit)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lumo_ray.codecs import base, image_vq
from lumo_ray.codecs.base import ImageInput, MediaError
from lumo_ray.codecs.image_vq import build_vq_adapter
from lumo_ray.config import ImageConfig, RuntimeConfig
from lumo_ray.uti import declared_identity


@pytest.fixture(scope="module")
def vq():
    return build_vq_adapter(ImageConfig(), RuntimeConfig())


@pytest.fixture(scope="module")
def real_images(real_data) -> list[Path]:
    files = sorted((real_data / "llava_pretrain" / "images").glob("*.png"))
    assert len(files) >= 8
    return files[:8]


def test_real_images_preprocess_record(vq, real_images):
    for f in real_images:
        x = vq.load(str(f))
        with Image.open(f) as im:
            w, h, mode = im.width, im.height, im.mode
        assert x.pixels.shape == (3, 32, 32) and x.pixels.dtype == np.float32
        assert 0.0 <= x.pixels.min() and x.pixels.max() <= 1.0
        r = x.record
        assert r["orig_size"] == [w, h] and r["mode"] == mode and r["size"] == [32, 32]
        assert min(r["resized_to"]) == 32
        left, top, right, bottom = r["crop_box"]
        assert right - left == 32 and bottom - top == 32
        assert left == (r["resized_to"][0] - 32) // 2 and top == (r["resized_to"][1] - 32) // 2


def test_non_square_non_rgb_inputs(vq):
    rgba = Image.new("RGBA", (100, 50), (255, 0, 0, 128))
    x = vq.prepare(rgba, "wide.png")
    assert x.record["mode"] == "RGBA" and x.record["resized_to"] == [64, 32]
    assert x.record["crop_box"] == [16, 0, 48, 32]
    assert np.allclose(x.pixels[0], 1.0) and np.allclose(x.pixels[1:], 0.0)  # alpha dropped, colour kept
    gray = vq.prepare(Image.new("L", (30, 90), 128), "tall.png")
    assert gray.record["mode"] == "L" and gray.record["resized_to"] == [32, 96]
    assert gray.pixels.shape == (3, 32, 32) and np.allclose(gray.pixels, 128 / 255)


def test_codes_shape_range_dtype(vq, real_images):
    codes = vq.encode_batch([vq.load(str(f)) for f in real_images])
    assert vq.tokens_per_image == 64 and vq.codebook_size == 256 and vq.image_size == 32
    for c in codes:
        assert c.shape == (64,) and c.dtype == np.int64
        assert c.min() >= 0 and c.max() < 256
    # spread-out, image-dependent codes
    assert len(np.unique(np.concatenate(codes))) > 32
    assert not np.array_equal(codes[0], codes[1])


def test_batch_equals_single(vq, real_images):
    imgs = [vq.load(str(f)) for f in real_images]
    batched = vq.encode_batch(imgs)
    for x, c in zip(imgs, batched):
        assert np.array_equal(vq.encode_batch([x])[0], c)
    # and a code never depends on which other images share the batch
    assert np.array_equal(vq.encode_batch(imgs[3:5])[1], batched[4])


def test_deterministic_across_builds_and_seed_matters(vq, real_images):
    imgs = [vq.load(str(f)) for f in real_images[:4]]
    again = build_vq_adapter(ImageConfig(), RuntimeConfig())
    for a, b in zip(vq.encode_batch(imgs), again.encode_batch(imgs)):
        assert np.array_equal(a, b)
    other = build_vq_adapter(ImageConfig(seed=1), RuntimeConfig())
    assert any(not np.array_equal(a, b) for a, b in zip(vq.encode_batch(imgs), other.encode_batch(imgs)))
    assert other.identity()["model"].startswith("tiny-init@sha256:")  # seed 1: the untrained init, by its weights


def test_decode_size_dtype_deterministic(vq, real_images):
    c = vq.encode_batch([vq.load(str(real_images[0]))])[0]
    img = vq.decode(c, seed=0)
    assert vq.deterministic_decode is True
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, vq.decode(c, seed=0)) and np.array_equal(img, vq.decode(c, seed=5))
    with pytest.raises(ValueError, match="outside"):
        vq.decode(np.full(64, 256))
    with pytest.raises(ValueError, match="shape"):
        vq.decode(np.zeros(10, np.int64))


def test_identity_equals_declared(vq):
    ident = vq.identity()
    digest = hashlib.sha256(base.TINY_VQ_WEIGHTS.read_bytes()).hexdigest()
    assert ident == {"kind": "vq", "model": f"tiny@sha256:{digest}", "codebook_size": 256, "tokens_per_image": 64,
                     "resolution": 32}
    assert ident == declared_identity("image", ImageConfig(codebook_size=256, tokens_per_image=64))


def test_codebook_and_resolution_overrides(real_images):
    a = build_vq_adapter(ImageConfig(codebook_size=64, resolution=48), RuntimeConfig())
    assert (a.codebook_size, a.tokens_per_image, a.image_size) == (64, 144, 48)
    c = a.encode_batch([a.load(str(real_images[0]))])[0]
    assert c.shape == (144,) and c.max() < 64
    assert a.decode(c).shape == (48, 48, 3)
    assert a.identity() == declared_identity("image", ImageConfig(codebook_size=64, tokens_per_image=144, resolution=48))
    with pytest.raises(ValueError, match="multiple of the VQ downsampling factor 4"):
        build_vq_adapter(ImageConfig(resolution=30), RuntimeConfig())


def test_local_pretrained_directory_matches_preset(vq, real_images, tmp_path):
    vq.model.save_pretrained(str(tmp_path / "vqgan"))
    loaded = build_vq_adapter(ImageConfig(model=str(tmp_path / "vqgan")), RuntimeConfig())
    imgs = [vq.load(str(f)) for f in real_images[:2]]
    for a, b in zip(vq.encode_batch(imgs), loaded.encode_batch(imgs)):
        assert np.array_equal(a, b)
    assert loaded.identity()["model"].startswith("sha256:")  # weights digest, never the path
    with pytest.raises(ValueError, match="codebook of 256"):
        build_vq_adapter(ImageConfig(model=str(tmp_path / "vqgan"), codebook_size=512), RuntimeConfig())
    with pytest.raises(ValueError, match="cannot read a VQModel config"):
        build_vq_adapter(ImageConfig(model=str(tmp_path / "nothing-here")), RuntimeConfig())


def test_bad_inputs_raise_media_error(vq, real_images, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(MediaError, match=r"missing.png: file not found"):
        vq.load(str(missing))
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not a picture\n")
    with pytest.raises(MediaError, match=r"notes.png: not an image"):
        vq.load(str(text))
    data = real_images[0].read_bytes()
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"truncated.png: corrupt or truncated image"):
        vq.load(str(trunc))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(data[:100] + bytes(len(data) - 100))
    with pytest.raises(MediaError, match=r"corrupt.png: corrupt or truncated image"):
        vq.load(str(corrupt))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty.png: empty file \(0 bytes\)"):
        vq.load(str(empty))
    with pytest.raises(MediaError, match=r"zero.png: zero-size image \(0x10\)"):
        vq.prepare(Image.new("RGB", (0, 10)), "zero.png")


# Flat colours that a tokenizer must tell apart (black, white, the synth shape colours, cyan, magenta, grey)
FLAT = [(0, 0, 0), (255, 255, 255), (220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 200, 30), (0, 200, 200),
        (200, 0, 200), (128, 128, 128)]


def grid_codes(vq, im: Image.Image) -> np.ndarray:
    return vq.encode_batch([vq.prepare(im)])[0].reshape(vq.grid, vq.grid)


def test_flat_colours_get_one_distinct_code_each(init_vq):
    """The init: away from the borders a flat image is one code, and different colours are different
    codes (a purely random preset scattered 5-15 codes over a flat centre, shared between colours).
    (The trained preset: see test_trained_preset_keeps_flat_colours_apart.)"""
    vq = init_vq
    centres = []
    for c in FLAT:
        g = grid_codes(vq, Image.new("RGB", (32, 32), c))
        centre = set(g[2:6, 2:6].ravel().tolist())
        assert len(centre) == 1, (c, centre)
        centres.append(centre.pop())
    assert len(set(centres)) == len(FLAT)


def test_codes_are_local(init_vq):
    """The init: a coloured patch in the top-left corner leaves the far (bottom-right) quadrant's codes
    nearly unchanged: a cell's code depends on its neighbourhood, not on the whole image. (The trained
    preset keeps this less: its GroupNorm statistics are whole-image, and a patch flips about half of
    the far codes; docs/stage3_uti.md "Tiny image codec".)"""
    from PIL import ImageDraw

    vq = init_vq

    changed = []
    for bg in ((245, 245, 245), (40, 40, 40), (200, 200, 215), (235, 225, 200)):
        base = grid_codes(vq, Image.new("RGB", (32, 32), bg))
        for col in FLAT[2:6]:
            im = Image.new("RGB", (32, 32), bg)
            ImageDraw.Draw(im).rectangle([0, 0, 7, 7], fill=col)
            g = grid_codes(vq, im)
            assert (g[:2, :2] != base[:2, :2]).any()  # the patch itself is seen
            changed.append(int((g[4:, 4:] != base[4:, 4:]).sum()))
    assert np.mean(changed) <= 3.0, changed  # of 16 far cells (the random preset changed about 11)


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def init_vq():
    """The untrained data-dependent init (seed 1 has no shipped weights): the training starting point."""
    return build_vq_adapter(ImageConfig(seed=1), RuntimeConfig())


def test_tiny_fit_is_deterministic_across_processes_and_threads(init_vq):
    """The fit (projection + k-means codebook) gives bit-identical weights when redone in this process
    without the per-process cache, and in another process with 2 torch / BLAS threads."""
    here = _weights_digest(init_vq.model)
    image_vq._FITTED.clear()
    assert _weights_digest(build_vq_adapter(ImageConfig(seed=1), RuntimeConfig()).model) == here
    assert _weights_digest(image_vq.tiny_init(1)) == here
    code = ("import torch; torch.set_num_threads(2); import hashlib; "
            "from lumo_ray.codecs.image_vq import build_vq_adapter; from lumo_ray.config import ImageConfig, RuntimeConfig; "
            "m = build_vq_adapter(ImageConfig(seed=1), RuntimeConfig(threads=2)).model; h = hashlib.sha256()\n"
            "for k, v in sorted(m.state_dict().items()): h.update(k.encode()); h.update(v.numpy().tobytes())\n"
            "print(h.hexdigest())")
    env = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == here


def test_tiny_projection_and_codebook_are_fitted(init_vq):
    """quant_conv is an orthonormal projection (PCA) and post_quant_conv its transpose; the k-means
    codebook covers the latents of held-out generic images (a codebook drawn from noise-image
    statistics used fewer than half of its codes on them)."""
    vq = init_vq
    w = vq.model.quant_conv.weight.detach().double()[:, :, 0, 0]  # [4, 32]
    assert torch.allclose(w @ w.T, torch.eye(w.shape[0], dtype=torch.float64), atol=1e-5)
    assert torch.equal(vq.model.post_quant_conv.weight.detach()[:, :, 0, 0], vq.model.quant_conv.weight.detach()[:, :, 0, 0].T)
    held_out = image_vq.procedural_images(64, 32, seed=123)  # the fit uses seed 1's images
    assert held_out.shape == (64, 3, 32, 32) and held_out.dtype == np.float32
    assert np.array_equal(held_out[:4], image_vq.procedural_images(4, 32, seed=123))  # image i depends on (seed, i) only
    codes = np.concatenate(vq.encode_batch([ImageInput(pixels=x) for x in held_out]))
    assert len(np.unique(codes)) >= 200


@pytest.mark.parametrize("where", ["preset", "local_dir"])
def test_sizes_from_the_config_match_the_built_model_and_the_weights_wait_for_first_use(vq, real_images, tmp_path, where):
    """A loader or a tokenize driver that only needs sizes never builds weights (the full f16 preset
    took ~24 s to build); once built, the model agrees with the sizes read from its config, and lazy
    building gives the codes of building first. Also for a local diffusers directory (LDM layout:
    weights in a vqvae/ subfolder), whose sizes come from its config.json."""
    cfg = ImageConfig()
    if where == "local_dir":
        vq.model.save_pretrained(tmp_path / "ldm" / "vqvae")
        cfg = ImageConfig(model=str(tmp_path / "ldm"))
    a = build_vq_adapter(cfg, RuntimeConfig())
    im = a.load(str(real_images[0]))
    assert a._model is None  # sizes, identity and load() needed no weights
    ident = a.identity()
    m = a.model
    assert (a.codebook_size, a.embed_dim) == tuple(m.quantize.embedding.weight.shape)
    assert a.grid == m.encode(torch.zeros(1, 3, a.image_size, a.image_size)).latents.shape[-1]
    assert ident == a.identity() and ident["tokens_per_image"] == a.grid ** 2
    b = build_vq_adapter(cfg, RuntimeConfig())
    b.model  # built before anything else ran
    assert np.array_equal(a.encode_batch([im])[0], b.encode_batch([im])[0])
    assert np.array_equal(a.encode_batch([im])[0], vq.encode_batch([im])[0])  # the same weights either way


# -- the shipped trained weights ----------------------------------------------------------------

def test_shipped_weights_are_small_packaged_and_what_the_preset_loads(vq):
    """The asset is well under 2 MB, named by pyproject's package data (so a non-editable install
    ships it), and the preset's weights are exactly the file's tensors (no training at build time)."""
    import fnmatch
    import tomllib

    from safetensors.torch import load_file

    w = base.TINY_VQ_WEIGHTS
    assert w.is_file() and w.stat().st_size < 1_500_000
    root = Path(image_vq.__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lumo_ray"]
    rel = w.relative_to(root / "lumo_ray").as_posix()
    assert any(fnmatch.fnmatch(rel, pat) for pat in data), (rel, data)
    sd = load_file(str(w))
    model_sd = vq.model.state_dict()
    assert set(sd) == set(model_sd)
    assert all(torch.equal(sd[k], model_sd[k]) for k in sd)
    meta = __import__("json").loads((w.parent / "meta.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()


def test_trained_preset_reconstructs_synthetic_images(vq):
    """The trained decoder reconstructs held-out synthetic shape images above the audit floors, and
    beats the untrained init (random decoder) by far; codes keep the shapes' colour."""
    from lumo_ray.data.synth import synthetic_shape_images
    from lumo_ray.eval.audit import TINY_VQ_PSNR_FLOOR, TINY_VQ_SSIM_FLOOR
    from lumo_ray.eval.metrics import reconstruction_metrics

    imgs = synthetic_shape_images(16, 2000, vq)  # (vq: the tiny preset at 32 px)
    r = reconstruction_metrics(vq, imgs)
    assert r["psnr"] >= TINY_VQ_PSNR_FLOOR and r["ssim"] >= TINY_VQ_SSIM_FLOOR, r
    init = reconstruction_metrics(build_vq_adapter(ImageConfig(seed=1), RuntimeConfig()), imgs)
    assert init["psnr"] < 15.0 and init["ssim"] < 0.5
    # the decoded shapes keep their colour: the mean of the most saturated pixels is nearest to the
    # caption colour about as often in the decode as in the input (chance 1/4)
    from lumo_ray.data.synth import COLOURS

    def colour(px: np.ndarray) -> str:
        px = px.reshape(-1, 3).astype(np.float64)
        top = px[np.argsort(px.max(1) - px.min(1))[-8:]].mean(0)
        return min(COLOURS, key=lambda k: np.sum((np.asarray(COLOURS[k]) - top) ** 2))

    hits = sum(colour(vq.decode(c)) == x.record["colour"] for x, c in zip(imgs, vq.encode_batch(imgs)))
    ref = sum(colour(np.transpose(x.pixels, (1, 2, 0)) * 255) == x.record["colour"] for x in imgs)
    assert hits >= min(12, ref - 1), (hits, ref)


def test_trained_preset_keeps_flat_colours_apart(vq):
    """Flat colours (wholly flat images are outside the training data) still get disjoint code sets
    in the image centre, and decode to their colour (within 35 per channel; black comes back dark grey)."""
    centres = []
    for c in FLAT:
        g = grid_codes(vq, Image.new("RGB", (32, 32), c))
        centres.append(set(g[2:6, 2:6].ravel().tolist()))
        dec = vq.decode(g.ravel())[8:24, 8:24].reshape(-1, 3).mean(0)
        if c != (0, 0, 0):
            assert np.abs(dec - np.asarray(c)).max() <= 35, (c, dec)
    assert all(not (a & b) for i, a in enumerate(centres) for b in centres[i + 1:]), centres
