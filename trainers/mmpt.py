"""`lumo train mmpt`: stage 4, any-to-any multimodal pretraining (i2t, a2t, t2i, t2a from the same shards).

The token-LM trainer (trainers/token_lm.py) with the sequence layout 'any': each training sequence's
task is drawn from `token_lm.mmpt.task_weights` (x2t only during `ramp_steps`, t2x blended in over
`blend_steps`) and takes the next sample of that task's modality, so every x2t sample also trains
its t2x twin. It starts from a stage-3.3 run (`token_lm.mmpt.init`) or warm-starts from
`token_lm.base`, logs per-task train and eval losses at every eval, and writes golden generations at
every checkpoint. Checkpoints, exact resume, token-space refusal and export are the token LM's.
"""
from __future__ import annotations

from typing import Optional

from lumo_ray.config import LumoConfig

# What `lumo train mmpt` changes from the stage-3.3 defaults; a config file or --set still wins.
# LoRA + new rows as the public stage-4 trial; whole 2 s clips of the tiny codec (2 codebooks x 75
# frames/s = 300 ids) as t2a targets, so a target is what its caption describes.
MMPT_DEFAULTS = ["token_lm.seq.layouts=any", "token_lm.freeze=lora", "token_lm.out=runs/mmpt",
                 "token_lm.seq.max_audio_tokens=300"]


def check_mmpt(cfg: LumoConfig) -> None:
    if cfg.token_lm.seq.layouts != "any":
        raise ValueError(f"stage 4 trains the 'any' layout; token_lm.seq.layouts is {cfg.token_lm.seq.layouts!r} "
                         "(use `lumo train token-lm` for the stage-3.3 layouts)")
    if cfg.token_lm.mmpt.task_weights.t2i > 0 and cfg.uti.image.kind == "clip_kmeans":  # encode-only images
        from lumo_ray.uti import build_token_space
        build_token_space(cfg.uti).require_image_decoder("stage 4 (token_lm.mmpt.task_weights.t2i > 0)")


def run_mmpt(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """Ray Train DDP job; returns metrics.json (per-task losses under 'eval' and 'train_tasks')."""
    from .token_lm import run_token_lm

    check_mmpt(cfg)
    m = run_token_lm(cfg, address=address, log=log)
    log("mmpt: train loss per task " + ", ".join(f"{k} {v:.3f}" for k, v in m.get("train_tasks", {}).items())
        + f"; golden generations: {', '.join(m.get('golden', [])) or 'none'}")
    return m
