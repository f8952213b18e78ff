"""`lumo tune prompts`: a Ray Tune study of prompt / sequence choices for the token LM.

Each trial is a function trainable that trains a short token-LM run (in its own trial directory):
in-process on what it reserves, or (prompt_study.num_workers > 0) as a Ray Train run of that many
workers whose rank 0 scores (trainers/tune_study.py). Every `report_every` steps it is scored:
objective = the smaller of the per-modality relative noise gaps ((loss_noise - loss_correct) /
loss_correct) on a fixed eval slice, shuffle gaps reported beside it; a trial whose text invariance
fails scores -1. ASHA stops weak trials early; as many trials run at a time as the cluster holds.
Writes results.csv, results.md, best.json and best_config.yaml (the full config with the best
choices applied). The study passes when its best trial also passes the modality ablation (text
invariance alone holds by construction for new_rows).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from lumo_ray.config import LumoConfig, dump_config
from lumo_ray.data.mix import primary
from lumo_ray.storage import RunDir, locate, resolve
from lumo_ray.token_space import TokenSpace

AXES = ("instruction", "delimiters", "new_row_lr", "init_scale", "max_audio_tokens", "modality_dropout")
SECTION = "token_lm.prompt_study"


def apply_choices(cfg: LumoConfig, choice: dict) -> LumoConfig:
    """A copy of cfg with one trial's choices set in token_lm."""
    cfg = copy.deepcopy(cfg)
    c = cfg.token_lm
    for k, v in choice.items():
        if k in ("instruction", "delimiters", "max_audio_tokens", "modality_dropout"):
            setattr(c.seq, k, v)
        elif k in ("new_row_lr", "init_scale"):
            setattr(c, k, float(v))
    return cfg


def score(model, base, ts: TokenSpace, cfg: LumoConfig, slice_: dict, encode) -> dict:
    """Objective and its parts for one model state."""
    from lumo_ray.eval.modality_ablation import modality_ablation
    from lumo_ray.eval.text_invariance import text_invariance

    c = cfg.token_lm
    was = model.training
    rep = modality_ablation(model, ts, primary(c.shards), c.seq, c.ablation, encode, slice_)
    inv = text_invariance(model, base, ts, c.invariance.prompts, encode, c.freeze)
    model.train(was)
    out: dict = {"text_invariance": inv["pass"], "ablation_pass": rep["pass"]}
    rels = []
    for m, r in rep["modalities"].items():
        if "noise" not in r:
            rels.append(float("-inf"))
            continue
        rels.append(r["noise"]["rel_gap"])
        out[f"noise_rel_gap_{m}"] = r["noise"]["rel_gap"]
        out[f"noise_gap_{m}"] = r["noise"]["gap"]
        out[f"shuffle_gap_{m}"] = r["shuffle"]["gap"]
        out[f"shuffle_win_{m}"] = r["shuffle"]["win"]
    obj = min(rels) if rels else float("-inf")
    out["objective"] = float(obj) if inv["pass"] and obj != float("-inf") else -1.0
    return out


def make_score(cfg: LumoConfig, ts: TokenSpace):
    """score(model) of one trial, built where its model trains (the trial, or rank 0 of its Ray Train run)."""
    from lumo_ray.codecs.text import build_text_adapter
    from lumo_ray.eval.modality_ablation import ablation_slice
    from lumo_ray.models.token_lm import load_causal_lm

    c = cfg.token_lm
    encode = build_text_adapter(cfg.uti.text).encode
    base = load_causal_lm(c.base, ts.text_vocab, seed=c.train.seed)
    slice_ = ablation_slice(primary(c.shards), ts, c.ablation)  # a mix: its first source
    return lambda model: score(model, base, ts, cfg, slice_, encode)


def _trial(choice: dict, cfg: LumoConfig, ts_json: dict, storage: str) -> None:
    from .tune_study import train_trial, trial_config

    ps = cfg.token_lm.prompt_study
    cfg, trial_dir = trial_config(cfg, choice, apply_choices, ps, storage)
    cfg.token_lm.ablation.n = ps.ablation_n
    train_trial(cfg, TokenSpace.from_json(ts_json), ps, trial_dir, make_score, SECTION)


def run_prompt_study(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """Run the study; returns {'best': {...}, 'trials': [...], 'out': path, 'pass': bool}."""
    from pipelines.ray_env import init_ray

    from .token_lm import prepare_run, run_token_space
    from .tune_study import fit_study, write_results

    ps = cfg.token_lm.prompt_study
    study = RunDir(ps.out)  # a URI study directory: results are written locally, then pushed
    out = study.local
    storage = resolve(ps.storage_path) if ps.storage_path else str(study)
    cfg = copy.deepcopy(cfg)
    cfg.token_lm.out = str(study.loc / "base_run")
    prepare_run(cfg)  # absolute shard / base paths for the trial workers
    dump_config(cfg, out)
    ts = run_token_space(cfg)
    init_ray(address)
    grid = fit_study(_trial, cfg, ts.to_json(), ps, AXES, storage, "max", "prompt study", out, log, SECTION)
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": Path(r.path).name, **{k: r.config.get(k) for k in AXES},
                     "objective": m.get("objective", float("nan")), "reports": m.get("training_iteration", 0),
                     "text_invariance": m.get("text_invariance"), "ablation_pass": m.get("ablation_pass"),
                     **{k: v for k, v in m.items() if k.startswith(("noise_rel_gap_", "shuffle_gap_", "shuffle_win_"))},
                     "error": str(r.error)[:200] if r.error else "",
                     "dir": str(locate(storage) / "study" / Path(r.path).name)})
    rows.sort(key=lambda x: -(x["objective"] if x["objective"] == x["objective"] else -1e9))
    ok = [r for r in rows if r.get("text_invariance") and r["objective"] == r["objective"] and r["objective"] > -1]
    res = write_results(rows, ok[0] if ok else None, cfg, out, AXES, apply_choices, log=log, name=str(study),
                        title="Prompt study", rule="objective = min over modalities of the relative noise gap "
                                                   "(text invariance required)", none="no trial passed text invariance")
    # the study passes when its best trial's model reads its media (the modality ablation, on the
    # trial's ablation_n eval samples); naming a best config alone is no verdict
    reads = bool(res["best"] and res["best"].get("ablation_pass"))
    if res["best"] and not reads:
        log(f"prompt study FAIL: the best trial ({res['best']['trial']}) fails the modality ablation")
    with open(out / "results.md", "a") as fh:
        fh.write(f"\n**verdict**: {'PASS' if reads else 'FAIL'} (the best trial must pass the modality ablation)\n")
    study.push()
    study.discard()
    return {**res, "pass": reads, "out": str(study)}
