"""The demo's data: synthetic shapes and beeps in the raw LLaVA / AudioCaps layouts -> normalize (Ray
Data) -> one manifest -> tokenize (Ray Data actor pools) -> shards. The data stage verifies them; the
lm and stage-4 stages train on a larger set built the same way."""
from __future__ import annotations

from pathlib import Path

from ...config import LumoConfig

SOURCES = ("llava_pretrain", "audiocaps")  # the synth layouts: images + captions, clips + captions


def synth_to_shards(out: Path, n_images: int, n_audio: int, seed: int, cfg: LumoConfig,
                    address: str | None = None, log=print) -> tuple[Path, Path, dict]:
    """out/synth, out/normalize_<source>, out/manifest.jsonl, out/shards; returns (shards, manifest,
    tokenize summary)."""
    from pipelines.normalize import run_normalize
    from pipelines.tokenize import run_tokenize

    from ...data.manifest_merge import merge_manifests
    from ...data.synth import write_synth

    out = Path(out)
    write_synth(out / "synth", n_images, n_audio, seed=seed)
    for src in SOURCES:
        run_normalize(src, out / "synth" / src, out / f"normalize_{src}", cfg.data.normalize, address)
    # What `lumo data tokenize --manifest A B` does; in id order (audiocaps:... < llava_pretrain:...), so the
    # merged manifest is sorted, as each normalize output is, and tokenize streams it
    merge_manifests([out / f"normalize_{src}" / "manifest.jsonl" for src in sorted(SOURCES)], out / "manifest.jsonl")
    summary = run_tokenize(out / "manifest.jsonl", cfg, out / "shards", address=address, log=log)
    return out / "shards", out / "manifest.jsonl", summary
