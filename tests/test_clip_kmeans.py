"""The clip_kmeans image tokenizer (semantic image tokens): synthetic images -> normalize -> embed (CLIP
patches) -> fit-kmeans -> tokenize -> verify; a token LM trained on its i2t shards passes the modality
ablation for images and an undertrained one fails it; text -> image is refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lumo_ray.cli import main
from lumo_ray.config import LumoConfig, load_config

# images only: the token space has no audio range, the ablation checks the image modality
BASE = ["data.normalize.eval_permille=250", "uti.audio.kind=none", "token_lm.ablation.modalities=[image]"]


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, ray_local):
    from lumo_ray.data.synth import write_synth

    d = tmp_path_factory.mktemp("clipk")
    write_synth(d / "synth", 320, 0, seed=0)
    run = lambda *a: main([str(x) for x in a])  # noqa: E731
    assert run("data", "normalize", "--source", "llava_pretrain", "--input", d / "synth" / "llava_pretrain",
               "--out", d / "norm", "--set", "data.normalize.eval_permille=250") == 0
    manifest = d / "norm" / "manifest.jsonl"
    assert run("data", "embed", "--manifest", manifest, "--out", d / "emb", "--set", "data.embed.patches=true") == 0
    assert run("codec", "fit-kmeans", "--embeddings", d / "emb", "--k", 64, "--column", "patches",
               "--out", d / "codebook") == 0
    sets = BASE + ["uti.image.kind=clip_kmeans", f"uti.image.codebook={d / 'codebook'}"]
    cfg_file = d / "clip_kmeans.yaml"
    import yaml
    from lumo_ray.config import to_dict
    cfg_file.write_text(yaml.safe_dump(to_dict(load_config(LumoConfig, None, sets))))
    assert run("data", "tokenize", "--manifest", manifest, "--out", d / "shards", "--config", cfg_file) == 0
    rc = run("data", "verify", "--shards", d / "shards", "--manifest", manifest, "--out", d / "verify",
             "--config", cfg_file)
    return d, cfg_file, rc


def test_clip_kmeans_shards_tokenize_and_verify(pipeline):
    from lumo_ray.data.shards import load_index
    from lumo_ray.token_space import TokenSpace

    d, _, rc = pipeline
    assert rc == 0
    ts = TokenSpace.load(d / "shards")
    img = ts.adapters["image"]
    assert img["kind"] == "clip_kmeans" and img["decoder"] == "none" and not ts.image_decodable
    assert img["codebook_size"] == 64 and img["tokens_per_image"] == 16  # 4 x 4 CLIP patches
    assert img["codebook"] == "sha256:" + json.loads((d / "codebook" / "codebook.json").read_text())["sha256"]
    n = len((d / "norm" / "manifest.jsonl").read_text().splitlines())  # (normalize dedupes exact duplicates)
    assert n >= 300 and load_index(d / "shards")["totals"]["samples"] == n
    rep = json.loads((d / "verify" / "report.json").read_text())
    assert rep["checks"]["retokenize"]["pass"] and "0 decoded" in rep["checks"]["decode"]["summary"]


def _train(d, cfg_file, out, steps):
    from lumo_ray.eval.modality_ablation import run_modality_ablation
    from trainers.context import LocalContext
    from trainers.token_lm import token_lm_loop

    cfg = load_config(LumoConfig, cfg_file, [f"token_lm.shards={d / 'shards'}", f"token_lm.out={out}",
                                             "token_lm.freeze=full", f"token_lm.train.steps={steps}",
                                             f"token_lm.train.eval_every={steps}", f"token_lm.train.ckpt_every={steps}"])
    token_lm_loop(cfg, LocalContext(), log=quiet)
    return run_modality_ablation(out, out / "ablation", cfg)


def test_a_token_lm_trained_on_semantic_tokens_reads_them(pipeline, tmp_path):
    """500 steps (the demo's token-LM steps) from the tiny base, every weight training: the captions
    depend on the image tokens (shuffled and noise tokens cost it about 1 nat; measured with the trained
    CLIP preset: win rates 0.92 / 0.86 against thresholds 0.8 / 0.85; 200 steps, enough with the random
    preset's tokens, reach noise win 0.83 only); 30 steps have not learned that and fail."""
    d, cfg_file, _ = pipeline
    good = _train(d, cfg_file, tmp_path / "good", 500)
    img = good["modalities"]["image"]
    assert good["pass"] and good["n"]["image"] >= 64 and img["shuffle"]["gap"] > 0.1, img
    bad = _train(d, cfg_file, tmp_path / "bad", 30)
    assert not bad["pass"] and bad["modalities"]["image"]["shuffle"]["gap"] < 0.1


def test_text_to_image_is_refused_in_one_line(pipeline, tmp_path, capsys):
    from lumo_ray.errors import UserError
    from lumo_ray.uti import load_token_space

    d, cfg_file, _ = pipeline
    cfg = load_config(LumoConfig, cfg_file)
    ts = load_token_space(cfg.uti)
    with pytest.raises(UserError, match="text-to-image needs an image decoder"):
        ts.require_image_decoder("t2i")
    from lumo_ray.uti import build_adapters
    with pytest.raises(UserError, match="has no pixel decoder"):
        build_adapters(cfg.uti, ("image",)).image.decode(np.zeros(16, np.int64))
    rc = main(["train", "mmpt", "--config", str(cfg_file), "--set", f"token_lm.shards={d / 'shards'}",
               "--set", f"token_lm.out={tmp_path / 'mmpt'}", "--set", "token_lm.seq.layouts=any"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "text-to-image needs an image decoder" in err[0], err
