"""Semantic image tokens end to end: synthetic images -> normalize -> `lumo data embed` (CLIP patches,
the tiny trained preset) -> `lumo codec fit-kmeans` on the patches -> tokenize with
`uti.image.kind: clip_kmeans` -> verify -> base LM -> token LM (new rows) -> the modality ablation for
images; beside it the same run with the VQ image tokenizer (the demo's), as the baseline.

    python -m benchmarks.clip_kmeans_i2t [--images 2048] [--k 256] [--only clip_kmeans|vq] [--out DIR]

The demo's training settings (lumo_ray/config/recipes.py: DEMO_DATA, DEMO_TRAINING): base LM 400 steps,
token LM 500 steps at new_row_lr 0.003. Prints each stage's time and the ablation's image numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def run(kind: str, root: Path, images: int, k: int, quiet) -> dict:
    from lumo_ray.config.recipes import DEMO_DATA, DEMO_TRAINING
    from lumo_ray.config import LumoConfig, load_config
    from lumo_ray.data.manifest import read_manifest, write_manifest
    from lumo_ray.data.synth import write_synth
    from lumo_ray.eval.modality_ablation import run_modality_ablation
    from pipelines.embed import run_embed
    from pipelines.kmeans import fit_kmeans
    from pipelines.normalize import run_normalize
    from pipelines.tokenize import run_tokenize
    from pipelines.verify import run_verify
    from trainers.lm import run_lm
    from trainers.token_lm import run_token_lm

    t = {}
    out = root / kind
    t0 = time.time()
    base = load_config(LumoConfig, None, DEMO_DATA + DEMO_TRAINING + ["uti.audio.kind=none",
                                                                      "token_lm.ablation.modalities=[image]"])
    write_synth(out / "synth", images, 0, seed=0)
    run_normalize("llava_pretrain", out / "synth" / "llava_pretrain", out / "norm", base.data.normalize)
    write_manifest(read_manifest(out / "norm" / "manifest.jsonl")[0], out / "manifest.jsonl")
    t["normalize_s"] = time.time() - t0
    sets = []
    if kind == "clip_kmeans":
        t0 = time.time()
        ecfg = load_config(LumoConfig, None, ["data.embed.patches=true"])
        run_embed(out / "manifest.jsonl", ecfg, out / "emb", log=quiet)
        t["embed_s"] = time.time() - t0
        t0 = time.time()
        doc = fit_kmeans(out / "emb", k, out / "codebook", column="patches", log=quiet)
        t["kmeans_s"], t["kmeans_inertia"], t["kmeans_iterations"] = time.time() - t0, doc["inertia"], doc["iterations"]
        sets = ["uti.image.kind=clip_kmeans", f"uti.image.codebook={out / 'codebook'}"]
    cfg = load_config(LumoConfig, None, DEMO_DATA + DEMO_TRAINING + sets + [
        "uti.audio.kind=none", "token_lm.ablation.modalities=[image]"])
    t0 = time.time()
    run_tokenize(out / "manifest.jsonl", cfg, out / "shards", log=quiet)
    rep = run_verify(out / "shards", cfg, out / "verify", manifest=str(out / "manifest.jsonl"))
    t["tokenize_verify_s"], t["verify_pass"] = time.time() - t0, rep["pass"]
    cfg.lm.inputs, cfg.lm.out = [str(out / "manifest.jsonl")], str(out / "lm")
    t0 = time.time()
    run_lm(cfg, log=quiet)
    t["base_lm_s"] = time.time() - t0
    c = cfg.token_lm
    c.shards, c.base, c.out, c.freeze = str(out / "shards"), str(out / "lm" / "export"), str(out / "token_lm"), "new_rows"
    t0 = time.time()
    m = run_token_lm(cfg, log=quiet)
    t["token_lm_s"], t["token_lm_eval"], t["token_lm_start"] = time.time() - t0, m["eval_loss"], m["eval_at_start"]["eval_loss"]
    abl = run_modality_ablation(out / "token_lm", out / "ablation", cfg)
    img = abl["modalities"]["image"]
    t.update(ablation_pass=abl["pass"], n=abl["n"]["image"], shuffle_gap=img["shuffle"]["gap"],
             shuffle_win=img["shuffle"]["win"], noise_gap=img["noise"]["gap"], noise_win=img["noise"]["win"])
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--only", choices=["clip_kmeans", "vq"], default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    root = Path(a.out or tempfile.mkdtemp(prefix="lumo-clip-kmeans-"))
    quiet = lambda *x, **k: None  # noqa: E731
    kinds = [a.only] if a.only else ["clip_kmeans", "vq"]
    res = {kind: run(kind, root, a.images, a.k, quiet) for kind in kinds}
    print(f"# {a.images} synthetic images, k={a.k}; {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    keys = sorted({k for r in res.values() for k in r})
    print("| measure | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for k in keys:
        print(f"| {k} | " + " | ".join(_fmt(res[kind].get(k)) for kind in kinds) + " |")
    (root / "clip_kmeans_i2t.json").write_text(json.dumps(res, indent=2))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
