"""`lumo tune mmpt`: a Ray Tune study of the stage-4 task mix and optimisation (task weights, ramp
length, LoRA rank, new-row LR, LoRA LR).

Each trial is a function trainable that trains a short stage-4 run from `token_lm.mmpt.init` (its own
trial directory, no golden generations): in-process on what it reserves, or (study.num_workers > 0) as
a Ray Train run whose rank 0 scores (trainers/tune_study.py). Every `report_every` steps it is scored
on fixed seeded eval slices: objective = mean eval loss over i2t, a2t, t2i and t2a (minimised);
constraints = the prompt ablation (t2i, t2a) and the modality ablation (image, audio), each at its
gate thresholds (docs/gates.md). An infeasible trial reports objective + 100 so ASHA stops it early; the best trial is
the feasible one with the lowest objective. Writes results.csv, results.md, best.json and
best_config.yaml (the full config with the best choices applied).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from lumo_ray.config import LumoConfig, dump_config
from lumo_ray.data.mix import primary
from lumo_ray.storage import RunDir, locate, resolve
from lumo_ray.token_space import TokenSpace

AXES = ("t2x_share", "ramp_steps", "lora_r", "new_row_lr", "lora_lr")
TASKS = ("i2t", "a2t", "t2i", "t2a")
INFEASIBLE = 100.0  # added to the objective of a trial that fails a constraint
SECTION = "token_lm.mmpt.study"


def apply_choices(cfg: LumoConfig, choice: dict) -> LumoConfig:
    """A copy of cfg with one trial's choices set in token_lm."""
    cfg = copy.deepcopy(cfg)
    c = cfg.token_lm
    if "t2x_share" in choice:
        s = float(choice["t2x_share"])
        w = c.mmpt.task_weights
        w.t2i = w.t2a = s / 2
        w.i2t = w.a2t = (1 - s) / 2
    if "ramp_steps" in choice:
        c.mmpt.ramp_steps = c.mmpt.blend_steps = int(choice["ramp_steps"])
    if "lora_r" in choice:
        c.lora.r, c.lora.alpha = int(choice["lora_r"]), 2 * int(choice["lora_r"])
    if "new_row_lr" in choice:
        c.new_row_lr = float(choice["new_row_lr"])
    if "lora_lr" in choice:
        c.train.lr = float(choice["lora_lr"])
    return cfg


def score(model, ts: TokenSpace, cfg: LumoConfig, slices: dict, builder, encode=None) -> dict:
    """Objective (mean per-task eval loss) and the constraint verdicts for one model state."""
    from lumo_ray.eval.gates import prompt_ablation
    from lumo_ray.eval.modality_ablation import modality_ablation

    from .context import LocalContext
    from .token_lm import evaluate_tasks

    was = model.training
    ev = evaluate_tasks(model, builder, slices["eval"], LocalContext())
    pr = prompt_ablation(model, builder, slices["prompt"], seed=cfg.token_lm.mmpt.study.seed)
    ab = modality_ablation(model, ts, primary(cfg.token_lm.shards), cfg.token_lm.seq, cfg.token_lm.ablation,
                           encode, slices["ablation"])
    model.train(was)
    losses = [ev[t] for t in TASKS if t in ev]
    loss = sum(losses) / len(losses) if len(losses) == len(TASKS) else float("inf")
    feasible = bool(pr["pass"] and ab["pass"] and loss < float("inf"))
    out = {"mean_eval_loss": loss, "prompt_gate": pr["pass"], "modality_gate": ab["pass"], "feasible": feasible,
           "objective": loss if feasible else loss + INFEASIBLE,
           **{f"eval_{t}": ev.get(t, float("nan")) for t in TASKS}}
    for t, r in pr["tasks"].items():
        out[f"{t}_win_swapped"] = r.get("swapped", {}).get("win", float("nan"))
    for m, r in ab["modalities"].items():
        out[f"{m}_shuffle_win"] = r.get("shuffle", {}).get("win", float("nan"))
    return out


def study_slices(cfg: LumoConfig, ts: TokenSpace) -> dict:
    """The fixed, seeded eval slices every trial is scored on."""
    from lumo_ray.eval.gates import prompt_slice
    from lumo_ray.eval.modality_ablation import ablation_slice

    c, st = cfg.token_lm, cfg.token_lm.mmpt.study
    ab = ablation_slice(primary(c.shards), ts, c.ablation)  # a mix: its first source
    return {"ablation": ab, "prompt": prompt_slice(primary(c.shards), ts, st.n, st.seed),
            "eval": [s for m in ("image", "audio") for s in ab.get(m, [])]}


def make_score(cfg: LumoConfig, ts: TokenSpace):
    """score(model) of one trial, built where its model trains (the trial, or rank 0 of its Ray Train run)."""
    from lumo_ray.codecs.text import build_text_adapter
    from lumo_ray.data.sequences import SequenceBuilder

    encode = build_text_adapter(cfg.uti.text).encode
    builder = SequenceBuilder(ts, cfg.token_lm.seq, encode)
    slices = study_slices(cfg, ts)
    return lambda model: score(model, ts, cfg, slices, builder, encode)


def _trial(choice: dict, cfg: LumoConfig, ts_json: dict, storage: str) -> None:
    from .tune_study import train_trial, trial_config

    st = cfg.token_lm.mmpt.study
    cfg, trial_dir = trial_config(cfg, choice, apply_choices, st, storage)
    cfg.token_lm.mmpt.golden_n = 0  # trials are scored, not looked at
    train_trial(cfg, TokenSpace.from_json(ts_json), st, trial_dir, make_score, SECTION)


def run_mmpt_study(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """Run the study; returns {'best': {...}, 'trials': [...], 'out': path, 'pass': bool}."""
    from pipelines.ray_env import init_ray

    from .mmpt import check_mmpt
    from .token_lm import prepare_run, run_token_space
    from .tune_study import fit_study, write_results

    check_mmpt(cfg)
    st = cfg.token_lm.mmpt.study
    study = RunDir(st.out)  # a URI study directory: results are written locally, then pushed
    out = study.local
    storage = resolve(st.storage_path) if st.storage_path else str(study)
    cfg = copy.deepcopy(cfg)
    cfg.token_lm.out = str(study.loc / "base_run")
    prepare_run(cfg)  # absolute shard / init paths for the trial workers
    if not cfg.token_lm.mmpt.init:
        log("mmpt study: token_lm.mmpt.init is empty: trials warm-start from token_lm.base")
    dump_config(cfg, out)
    ts = run_token_space(cfg)
    init_ray(address)
    grid = fit_study(_trial, cfg, ts.to_json(), st, AXES, storage, "min", "mmpt study", out, log, SECTION)
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": Path(r.path).name, **{k: r.config.get(k) for k in AXES},
                     "objective": m.get("objective", float("nan")), "feasible": m.get("feasible", False),
                     "reports": m.get("training_iteration", 0),
                     **{k: v for k, v in m.items() if k.startswith("eval_") or k.endswith("_win") or
                        k.endswith(("_win_swapped", "_shuffle_win", "_gate"))},
                     "error": str(r.error)[:200] if r.error else "",
                     "dir": str(locate(storage) / "study" / Path(r.path).name)})
    rows.sort(key=lambda x: (not x["feasible"], x["objective"] if x["objective"] == x["objective"] else 1e9))
    best = rows[0] if rows and rows[0]["feasible"] else None
    res = write_results(rows, best, cfg, out, AXES, apply_choices, log=log, name=str(study), title="Stage-4 study",
                        rule="objective = mean eval loss over i2t, a2t, t2i, t2a (lower is better); feasible = "
                             "prompt ablation (t2i, t2a) and modality ablation (image, audio) pass",
                        none="no trial passed both constraints")
    study.push()
    study.discard()
    return {**res, "out": str(study)}
