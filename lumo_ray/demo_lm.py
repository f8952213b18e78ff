"""The lm part of `lumo demo`: base LM -> token LM (new_rows) -> modality ablation -> text invariance
-> a small prompt study. Also `build_synth_shards`, the synthetic shard set the tests share."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import LumoConfig, load_config


def build_synth_shards(out: Path, n_images: int = 48, n_audio: int = 48, seed: int = 0,
                       overrides: list[str] | None = None, log=print) -> tuple[Path, Path, LumoConfig]:
    """write_synth -> normalize (llava_pretrain, audiocaps) -> one manifest -> tokenize. Reuses a
    finished build in `out` (index.json present). Returns (shards_dir, manifest, cfg)."""
    from pipelines.normalize import run_normalize
    from pipelines.tokenize import run_tokenize

    from .data.manifest import read_manifest, write_manifest
    from .data.synth import write_synth

    # a large eval share: the ablation slice is drawn from eval, and synth sets are small
    cfg = load_config(LumoConfig, None, ["data.normalize.eval_permille=250", "data.tokenize.shard_size=32",
                                         "data.tokenize.batch_size=16"] + list(overrides or []))
    out = Path(out)
    shards, manifest = out / "shards", out / "manifest.jsonl"
    if (shards / "index.json").exists() and manifest.exists():
        return shards, manifest, cfg
    write_synth(out / "synth", n_images, n_audio, seed=seed)
    recs = []
    for src, sub in (("llava_pretrain", "llava_pretrain"), ("audiocaps", "audiocaps")):
        run_normalize(src, out / "synth" / sub, out / f"norm_{src}", cfg.data.normalize)
        recs += read_manifest(out / f"norm_{src}" / "manifest.jsonl")[0]
    write_manifest(recs, manifest)
    run_tokenize(manifest, cfg, shards, log=log)
    return shards, manifest, cfg
