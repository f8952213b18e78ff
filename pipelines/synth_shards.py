"""Synthetic shards end to end: shapes and beeps in the raw LLaVA / AudioCaps layouts
(lumo_ray/data/synth.py) -> normalize (Ray Data) -> one manifest -> tokenize (Ray Data actor pools) ->
shards. The demo's data stages run it, and so do the tests and benchmarks that need a shard set
(`build_synth_shards`: the demo's data settings and training budgets, a finished build reused)."""
from __future__ import annotations

from pathlib import Path

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.config.recipes import DEMO_DATA, DEMO_TRAINING

SOURCES = ("llava_pretrain", "audiocaps")  # the synth layouts: images + captions, clips + captions


def synth_to_shards(out: Path, n_images: int, n_audio: int, seed: int, cfg: LumoConfig,
                    address: str | None = None, log=print) -> tuple[Path, Path, dict]:
    """out/synth, out/normalize_<source>, out/manifest.jsonl, out/shards; returns (shards, manifest,
    tokenize summary)."""
    from lumo_ray.data.manifest_merge import merge_manifests
    from lumo_ray.data.synth import write_synth

    from .normalize import run_normalize
    from .tokenize import run_tokenize

    out = Path(out)
    write_synth(out / "synth", n_images, n_audio, seed=seed)
    for src in SOURCES:
        run_normalize(src, out / "synth" / src, out / f"normalize_{src}", cfg.data.normalize, address)
    # What `lumo data tokenize --manifest A B` does; in id order (audiocaps:... < llava_pretrain:...), so the
    # merged manifest is sorted, as each normalize output is, and tokenize streams it
    merge_manifests([out / f"normalize_{src}" / "manifest.jsonl" for src in sorted(SOURCES)], out / "manifest.jsonl")
    summary = run_tokenize(out / "manifest.jsonl", cfg, out / "shards", address=address, log=log)
    return out / "shards", out / "manifest.jsonl", summary


def demo_config(config: str | Path | None = None, overrides: list[str] | None = None) -> LumoConfig:
    """`config` (a YAML file; default the tiny preset) with the demo's recipes on top (its shard
    settings, configs/demo/data.yaml, and the lm stage's budgets, lm.yaml + token_lm.yaml), then
    `overrides`: the config the demo's lm stage trains with."""
    return load_config(LumoConfig, config, DEMO_DATA + DEMO_TRAINING + list(overrides or []))


def build_synth_shards(out: Path, n_images: int = 48, n_audio: int = 48, seed: int = 0,
                       overrides: list[str] | None = None, log=print,
                       config: str | Path | None = None) -> tuple[Path, Path, LumoConfig]:
    """The demo's synthetic shards (synth_to_shards under demo_config(config, overrides)), reused when
    `out` holds a finished build (index.json present). Returns (shards_dir, manifest, cfg)."""
    cfg = demo_config(config, overrides)
    out = Path(out)
    shards, manifest = out / "shards", out / "manifest.jsonl"
    if (shards / "index.json").exists() and manifest.exists():
        return shards, manifest, cfg
    shards, manifest, _ = synth_to_shards(out, n_images, n_audio, seed, cfg, log=log)
    return shards, manifest, cfg
