"""The real samples of every raw format normalize, tokenize and verify; the only errors are Clotho's empty
captions and AudioCaps' two duplicates (one recording under three ids and captions)."""
import json

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.manifest import read_manifest, write_manifest
from pipelines.normalize import run_normalize
from pipelines.tokenize import run_tokenize
from pipelines.verify import run_verify

SOURCES = {"llava_pretrain": 44, "audiocaps": 3, "clotho": 5, "wavcaps": 26}


def test_real_samples_end_to_end(real_data, tmp_path, ray_local):
    cfg = load_config(LumoConfig, None, ["data.normalize.error_rate_ceiling=0.9", "data.normalize.min_eval=2"])
    recs, errors = [], []
    for src, n in SOURCES.items():
        s = run_normalize(src, real_data / src, tmp_path / src, cfg.data.normalize)
        recs += read_manifest(tmp_path / src / "manifest.jsonl")[0]
        errors += [json.loads(l) for l in (tmp_path / src / "errors.jsonl").read_text().splitlines()]
        assert s["ok"] == n, (src, s)
    assert sorted((e["id"].split(":")[0], e["reason"]) for e in errors) == \
        [("audiocaps", "duplicate media")] * 2 + [("clotho", "empty caption")] * 20
    write_manifest(recs, tmp_path / "manifest.jsonl")
    summary = run_tokenize(tmp_path / "manifest.jsonl", cfg, tmp_path / "shards", log=lambda *a: None)
    assert summary["samples"] == 78 and summary["errors"] == 0
    rep = run_verify(tmp_path / "shards", cfg, tmp_path / "verify", log=lambda *a: None)
    assert rep["pass"], json.dumps(rep["checks"], indent=1)[:3000]
    assert rep["checks"]["retokenize"]["n"] == 78
    assert set(rep["length_stats"]) == {"a2t", "i2t"}
