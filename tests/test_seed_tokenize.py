"""`lumo data tokenize` and `lumo data verify` with the SEED-2 image tokenizer (tiny preset)."""
import json

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.normalize import normalize_local
from lumo_ray.data.shards import iter_tar, load_index
from lumo_ray.data.synth import write_synth
from lumo_ray.uti import load_token_space
from pipelines.tokenize import run_tokenize
from pipelines.verify import run_verify


def test_tokenize_and_verify_with_seed_tokenizer(tmp_path, ray_local):
    write_synth(tmp_path / "synth", 6, 0, seed=1)
    normalize_local("llava_pretrain", tmp_path / "synth" / "llava_pretrain", tmp_path / "norm")
    cfg = load_config(LumoConfig, None, ["uti.image.kind=seed", "uti.image.model=tiny", "uti.audio.kind=none",
                                         "data.verify.decode_spot_checks=1"])
    ts = load_token_space(cfg.uti)
    assert ts.range("IMAGE").size == 8192 and ts.adapters["image"]["tokens_per_image"] == 32
    summary = run_tokenize(tmp_path / "norm" / "manifest.jsonl", cfg, tmp_path / "shards", log=lambda *a: None)
    assert summary["samples"] == 6 and summary["errors"] == 0
    index = load_index(tmp_path / "shards")
    assert index["token_space_hash"] == ts.hash
    s = next(iter_tar(tmp_path / "shards" / index["shards"][0]["name"]))
    assert s["image"].size == 32 and ts.check_ids(s["image"], "image") == []
    rep = run_verify(tmp_path / "shards", cfg, tmp_path / "verify", log=lambda *a: None)
    assert rep["pass"], json.dumps(rep["checks"], indent=1)[:2000]
    assert rep["checks"]["decode"]["summary"].startswith("1 decoded")
