"""SEED-2 image adapter: tiny preset of the real architecture, strict checkpoints, unCLIP decode."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from lumo_ray.codecs.base import ImageInput, MediaError
from lumo_ray.codecs.image_seed import build_seed_adapter
from lumo_ray.codecs.seed import (REAL, CheckpointError, SeedQuantizer, load_seed_weights, save_seed_weights,
                                  tiny_arch)
from lumo_ray.config import AudioConfig, ImageConfig, RuntimeConfig, TextConfig, UTIConfig
from lumo_ray.uti import Adapters, build_token_space, declared_identity

RES = 32


@pytest.fixture(scope="module")
def no_network():
    """Every socket connection or DNS lookup fails while the adapters are built and used."""
    def refuse(*a, **k):
        raise OSError("network access attempted during SEED adapter test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def cfg() -> ImageConfig:
    return ImageConfig(kind="seed", model="tiny", resolution=RES, seed=0)


@pytest.fixture(scope="module")
def adapter(no_network, cfg):
    return build_seed_adapter(cfg, RuntimeConfig(batch_size=3))


@pytest.fixture(scope="module")
def images(real_data, adapter) -> list[ImageInput]:
    paths = sorted((real_data / "llava_pretrain" / "images").iterdir())[:5]
    return [adapter.load(str(p)) for p in paths]


def test_tiny_encode_is_deterministic_in_range_and_input_dependent(adapter, images):
    a = adapter.encode_batch(images)
    b = adapter.encode_batch(images)
    singles = [adapter.encode_batch([im])[0] for im in images]  # batch composition must not matter
    assert len(a) == len(images)
    for x, y, s in zip(a, b, singles):
        assert x.dtype == np.int64 and x.shape == (32,)
        assert np.array_equal(x, y) and np.array_equal(x, s)
        assert x.min() >= 0 and x.max() < 8192
    assert len({tuple(x) for x in a}) == len(images), "different images must give different codes"


def test_same_seed_rebuild_gives_same_codes(no_network, cfg, adapter, images):
    again = build_seed_adapter(cfg, RuntimeConfig())
    for x, y in zip(adapter.encode_batch(images), again.encode_batch(images)):
        assert np.array_equal(x, y)


def test_adapter_interface_and_identity(adapter, cfg):
    assert adapter.codebook_size == 8192 and adapter.tokens_per_image == 32
    assert adapter.image_size == RES and adapter.deterministic_decode is False
    ident = adapter.identity()
    assert ident["model"].startswith("tiny@sha256:")
    assert ident == {"kind": "seed", "model": ident["model"], "codebook_size": 8192, "tokens_per_image": 32,
                     "resolution": RES}
    declared = ImageConfig(kind="seed", model="tiny", resolution=RES, seed=0, codebook_size=8192,
                           tokens_per_image=32, load=False)
    assert ident == declared_identity("image", declared)


def test_token_space_with_seed_has_8192_image_ids(adapter, cfg, images):
    uti = UTIConfig(text=TextConfig(tokenizer="some-org/tokenizer-1000", load=False, vocab_size=1000),
                    audio=AudioConfig(kind="none"), image=cfg)  # a declared (not loaded) tokenizer of 1000 ids
    ts = build_token_space(uti, Adapters(image=adapter))
    img = ts.range("IMAGE")
    assert img.size == 8192 and img.start == 1000 + 64
    assert ts.adapters["image"]["tokens_per_image"] == 32
    ids = ts.image_to_global(adapter.encode_batch(images[:1])[0])
    assert ids.shape == (32,) and not ts.check_ids(ids, "image")
    # declared sizes (no model loaded) give the same token space hash
    declared = UTIConfig(text=uti.text, audio=uti.audio, image=ImageConfig(
        kind="seed", model="tiny", resolution=RES, codebook_size=8192, tokens_per_image=32, load=False))
    assert build_token_space(declared).hash == ts.hash


def test_qformer_attention_among_queries_is_causal(adapter, images):
    m = adapter.model
    px = adapter._pixels(images[:1])
    with torch.no_grad():
        base = m.query_features(px)
        saved = m.query_tokens.detach().clone()
        try:
            m.query_tokens[:, 5] += 1.0
            moved = m.query_features(px)
        finally:
            m.query_tokens.copy_(saved)
    assert torch.equal(base[:, :5], moved[:, :5]), "earlier queries must not see later ones"
    assert not torch.allclose(base[:, 5:], moved[:, 5:])


def test_seeded_decode_repeatable_and_sized(adapter, images):
    codes = adapter.encode_batch(images[:1])[0]
    a = adapter.decode(codes, seed=7)
    b = adapter.decode(codes, seed=7)
    c = adapter.decode(codes, seed=8)
    assert a.dtype == np.uint8 and a.shape == (RES, RES, 3)
    assert np.array_equal(a, b), "same codes + same seed must give the same pixels"
    assert not np.array_equal(a, c), "diffusion decode is stochastic across seeds"
    e1, e2 = adapter.embed(codes), adapter.embed(codes)
    assert e1.shape == (32,) and np.array_equal(e1, e2)  # codes -> conditioning embedding is exact


def test_state_dict_round_trip_through_real_loading_path(no_network, adapter, images, tmp_path):
    w = {"quantizer": str(tmp_path / "seed_quantizer.pt"), "eva_clip": str(tmp_path / "eva_vit_g.pth"),
         "unclip": str(tmp_path / "unclip")}
    save_seed_weights(adapter.model, w["quantizer"], w["eva_clip"])
    adapter.pipe.save_pretrained(w["unclip"])
    cfg = ImageConfig(kind="seed", model="real", resolution=RES, seed_weights=w)
    loaded = build_seed_adapter(cfg, RuntimeConfig(), arch=tiny_arch(RES))
    src, dst = adapter.model.state_dict(), loaded.model.state_dict()
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    assert loaded.ignored_keys == {"eva_clip": [], "quantizer": []}
    for x, y in zip(adapter.encode_batch(images), loaded.encode_batch(images)):
        assert np.array_equal(x, y)
    codes = adapter.encode_batch(images[:1])[0]
    assert np.array_equal(adapter.decode(codes, seed=3), loaded.decode(codes, seed=3))
    # the token-space identity of real weights is a digest of the weight files, never a path
    assert loaded.identity()["model"].startswith("seed2-weights:") and str(tmp_path) not in loaded.identity()["model"]


def _model_with(weights: dict) -> None:
    load_seed_weights(SeedQuantizer(tiny_arch(RES)), weights["quantizer"], weights["eva_clip"])


def test_mismatched_checkpoint_lists_missing_unexpected_and_shape_keys(adapter, tmp_path):
    q, e = tmp_path / "q.pt", tmp_path / "eva.pth"
    save_seed_weights(adapter.model, q, e)
    sd = torch.load(q, weights_only=True)
    del sd["distill_image_proj.weight"]
    sd["Qformer.cls.predictions.bias"] = torch.zeros(3)
    torch.save(sd, q)
    with pytest.raises(CheckpointError) as err:
        _model_with({"quantizer": q, "eva_clip": e})
    msg = str(err.value)
    assert str(q) in msg and "missing keys (1): distill_image_proj.weight" in msg
    assert "unexpected keys (1): Qformer.cls.predictions.bias" in msg

    save_seed_weights(adapter.model, q, e)
    sd = torch.load(q, weights_only=True)
    sd["quantize.embedding.weight"] = torch.zeros(4096, 8)  # a codebook of another size
    torch.save(sd, q)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): quantize\.embedding\.weight"):
        _model_with({"quantizer": q, "eva_clip": e})

    save_seed_weights(adapter.model, q, e)
    eva = torch.load(e, weights_only=True)
    eva.pop("pos_embed")
    torch.save(eva, e)
    with pytest.raises(CheckpointError, match=r"eva\.pth.*missing keys \(1\): pos_embed"):
        _model_with({"quantizer": q, "eva_clip": e})


def test_eva_checkpoint_extra_final_block_is_ignored_and_reported(adapter, tmp_path):
    q, e = tmp_path / "q.pt", tmp_path / "eva.pth"
    save_seed_weights(adapter.model, q, e)
    eva = torch.load(e, weights_only=True)
    depth = len(adapter.model.visual_encoder.blocks)
    for k in [k for k in eva if k.startswith("blocks.0.")]:  # EVA-CLIP's last block, unused by SEED
        eva[k.replace("blocks.0.", f"blocks.{depth}.")] = eva[k].clone()
    torch.save(eva, e)
    ignored = load_seed_weights(SeedQuantizer(tiny_arch(RES)), q, e)
    assert ignored["eva_clip"] and all(k.startswith(f"blocks.{depth}.") for k in ignored["eva_clip"])


def test_real_model_needs_local_weight_paths(no_network, tmp_path):
    with pytest.raises(ValueError, match=r"missing \['quantizer', 'eva_clip', 'unclip'\]"):
        build_seed_adapter(ImageConfig(kind="seed", model="real", resolution=224), RuntimeConfig())
    w = {"quantizer": str(tmp_path / "nope.pt"), "eva_clip": str(tmp_path), "unclip": str(tmp_path)}
    with pytest.raises(FileNotFoundError, match="seed_weights.quantizer"):
        build_seed_adapter(ImageConfig(kind="seed", model="real", resolution=224, seed_weights=w), RuntimeConfig())
    with pytest.raises(ValueError, match="'tiny' or 'real'"):
        build_seed_adapter(ImageConfig(kind="seed", model="AILab-CVC/seed-tokenizer-2"), RuntimeConfig())
    with pytest.raises(ValueError, match="multiple of 8"):
        build_seed_adapter(ImageConfig(kind="seed", model="tiny", resolution=30), RuntimeConfig())


def test_published_architecture_sizes_on_meta_device():
    with torch.device("meta"):
        m = SeedQuantizer(REAL)
    sd = m.state_dict()
    assert sd["quantize.embedding.weight"].shape == (8192, 32)
    assert sd["query_tokens"].shape == (1, 32, 768)
    assert sd["visual_encoder.pos_embed"].shape == (1, 257, 1408)  # 224 / 14 = 16 -> 256 patches + cls
    assert sd["visual_encoder.patch_embed.proj.weight"].shape == (1408, 3, 14, 14)
    assert len(m.visual_encoder.blocks) == 39
    assert sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape == (6144, 1408)
    cross = [i for i, layer in enumerate(m.Qformer.bert.encoder.layer) if layer.has_cross_attention]
    assert cross == [0, 2, 4, 6, 8, 10]
    assert sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (768, 1408)
    assert sd["distill_image_proj.weight"].shape == (1024, 32 * 32)
    assert sum(v.numel() for k, v in sd.items() if k.startswith("visual_encoder.")) == 985_894_528


def test_bad_inputs_raise_clear_errors(adapter, tmp_path):
    from PIL import Image

    with pytest.raises(MediaError, match="file not found"):
        adapter.load(str(tmp_path / "missing.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(MediaError, match="notes.png: cannot decode image"):
        adapter.load(str(tmp_path / "notes.png"))
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="trunc.png"):
        adapter.load(str(tmp_path / "trunc.png"))
    with pytest.raises(MediaError, match="expected a PIL image"):
        adapter.prepare(np.zeros((4, 4, 3)), name="array")
    with pytest.raises(ValueError, match="shape"):
        adapter.encode_batch([ImageInput(pixels=np.zeros((3, 16, 16), np.float32))])
    with pytest.raises(ValueError, match="out of"):
        adapter.decode(np.full(32, 8192, np.int64))
    with pytest.raises(ValueError, match="shape"):
        adapter.decode(np.zeros(31, np.int64))


def test_prepare_resizes_shorter_side_and_center_crops(adapter):
    from PIL import Image

    im = Image.new("RGBA", (80, 40), (255, 0, 0, 255))
    im.paste((0, 0, 255, 255), (0, 0, 20, 40))  # blue left quarter is cropped away
    x = adapter.prepare(im, name="wide")
    assert x.pixels.shape == (3, RES, RES) and x.pixels.dtype == np.float32
    assert x.record["orig_size"] == [80, 40] and x.record["resized_to"] == [64, 32]
    assert x.record["crop_box"] == [16, 0, 48, 32] and x.record["mode"] == "RGBA"
    assert 0.0 <= x.pixels.min() and x.pixels.max() <= 1.0
    assert x.pixels[2].max() < 0.05  # no blue survives the center crop
    gray = adapter.prepare(Image.new("L", (20, 50), 128), name="tall")
    assert gray.pixels.shape == (3, RES, RES) and np.allclose(gray.pixels, 128 / 255, atol=1e-6)


def test_guard_refuses_network(no_network):
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("example.com", 80), timeout=1)

