"""`lumo tune vlm`: Ray Tune grid over learning rate x vision LayerNorm (stage 1.1 LR sweep).

Each trial is a Tune *function trainable* (passing a TorchTrainer to Tuner is deprecated) that trains
in its own directory <out>/trials/<name> (a URI `out` is staged locally by each trial and uploaded when
it ends): the VLM loop in-process on the device Ray gave the trial, or (sweep.num_workers > 0) the Ray
Train run `lumo train vlm` would launch with the sweep's workers / use_gpu / strategy; then the trial
runs the ablation on the export. Score = eval loss - 0.1 x (delta_shuffled + delta_zero); lower is better.
The tiny LLM's text warm-up runs once in the driver and every trial reuses it.
"""
from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from typing import Callable, Optional

import yaml

from lumo_ray.config import LumoConfig, TrackingConfig, build, to_dict
from lumo_ray.config.vlm import VLMConfig
from lumo_ray.storage import RunDir, locate, ray_storage

from .context import LocalContext
from .vlm import prepare_run, run_loop


def trial_name(lr: float, layernorm: bool) -> str:
    return f"lr{lr:g}_ln{int(layernorm)}"


def trial_fn(config: dict) -> None:
    """One trial: train (in-process on the device Ray gave the trial, or as a Ray Train run of
    sweep.num_workers workers), ablate the export, report the score (last report = the trial's result)."""
    import torch
    from ray import tune

    from pipelines.ray_env import placement, quiet_actor_exit, unit_device

    quiet_actor_exit()
    torch.set_num_threads(1)
    cfg = build(VLMConfig, config["vlm"], "trial config", prefix="vlm.")
    cfg.train.lr, cfg.vision.layernorm = float(config["lr"]), bool(config["layernorm"])
    trial = RunDir(locate(config["sweep_dir"]) / "trials" / trial_name(cfg.train.lr, cfg.vision.layernorm))
    cfg.train.out = str(trial)
    sw, t = cfg.sweep, cfg.train
    if sw.num_workers:  # the run `lumo train vlm` would launch with the sweep's workers
        t.num_workers, t.cpus_per_worker, t.use_gpu, t.accelerator_type, t.strategy = (
            sw.num_workers, sw.cpus_per_worker, sw.use_gpu, sw.accelerator_type, sw.strategy)
    cfg, run = prepare_run(cfg, trial.local, log=lambda *_: None)  # llm.model: the shared warm-up, path or URI
    if sw.num_workers:
        final, placed = train_run(cfg, trial)
    else:
        device, ids = unit_device()
        final, placed = run_loop(cfg, run, LocalContext(device), log=lambda *_: None), placement(device, ids)
    m = score_run(cfg, run, final, config["ablation_n"])
    trial.push()
    trial.discard()
    tune.report({**m, "placement": placed})


def score_run(cfg: VLMConfig, run: Path, final: dict, n: int) -> dict:
    """A trial's report: its run's final metrics and the ablation of its export on n samples (written to
    the run), score = eval loss - 0.1 x (d_shuffled + d_zero)."""
    from lumo_ray.eval.vlm_ablation import ablation_from_export, write_ablation

    # a sweep scores trials on a small slice (sweep.ablation_n): its checks rank trials, the gate is
    # `lumo eval vlm-ablation` on the chosen run
    rep = ablation_from_export(run / "export", run / "splits.json", n=n, seed=cfg.ablation.seed, allow_small_n=True)
    write_ablation(rep, run)
    score = final["eval_loss"] - 0.1 * (rep["delta"]["shuffled"] + rep["delta"]["zero"])
    return {"score": score, "eval_loss": final["eval_loss"], "d_shuffled": rep["delta"]["shuffled"],
            "d_zero": rep["delta"]["zero"], "d_noise": rep["delta"]["noise"],
            "ablation_pass": float(all(rep["checks"].values())), "step": final["step"]}


def train_run(cfg: VLMConfig, trial: RunDir) -> tuple[dict, str]:
    """A trial's Ray Train run (trainers/vlm.py's workers on the trial's prepared run directory);
    returns its final metrics and where rank 0 computed. The run directory comes back into
    `trial.local` for the ablation."""
    from .launch import launch, storage_of
    from .vlm import train_func

    t = cfg.train
    trial.push()  # the workers pull the prepared run directory (a URI: each its own staging copy)
    storage = storage_of(t, trial.loc)
    loop = {"vlm": to_dict(cfg), "run_dir": str(trial), "storage": storage, "threads": t.cpus_per_worker}
    result = launch(train_func, loop, t, storage, "train", keep=2, section="vlm.sweep")
    trial.pull()
    final = json.loads((trial.local / "metrics.json").read_text())["final"]
    return final, (result.metrics or {}).get("placement", "?")


def run_sweep(cfg: LumoConfig | VLMConfig, address: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    from ray import tune

    from pipelines.ray_env import init_ray, quiet_tune, study_callbacks, trial_lines

    from .tune_resources import trial_kind, trial_resources, trials_at_once

    vcfg = copy.deepcopy(cfg.vlm if isinstance(cfg, LumoConfig) else cfg)
    tracking = cfg.tracking if isinstance(cfg, LumoConfig) else TrackingConfig()
    sw = vcfg.sweep
    sweep = RunDir(sw.out)  # a URI sweep directory is written in a local staging copy, then pushed
    out = sweep.local
    vcfg.train.steps = sw.steps
    vcfg.train.ckpt_every = sw.steps
    vcfg.train.eval_every = 0
    init_ray(address)
    conc = min(sw.max_concurrent, trials_at_once(sw, "vlm.sweep"))  # refuses a trial the cluster cannot hold
    # text warm-up once, shared by the trials
    vcfg, _ = prepare_run(vcfg, out / "shared", log, name=str(sweep.loc / "shared"))
    sweep.push()
    quiet_tune()
    log(f"vlm sweep: {len(sw.lrs) * len(sw.layernorm)} trials, {conc} at a time, {trial_kind(sw)}, out {sweep}")
    trainable = tune.with_resources(trial_fn, trial_resources(sw))
    space = {"vlm": to_dict(vcfg), "sweep_dir": str(sweep), "ablation_n": sw.ablation_n,
             "lr": tune.grid_search(list(sw.lrs)), "layernorm": tune.grid_search(list(sw.layernorm))}
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(metric="score", mode="min", max_concurrent_trials=conc),
                       run_config=tune.RunConfig(**ray_storage(sw.storage_path or sweep.loc / "ray"), name="tune", verbose=0,
                                                 callbacks=[trial_lines(log, "score", len(sw.lrs) * len(sw.layernorm)),
                                                            *study_callbacks(tracking, "vlm sweep")]))
    rows = sweep_rows(tuner.fit(), sweep)
    table, best = write_results(out, rows, vcfg)
    sweep.push()
    sweep.discard()
    return {"rows": rows, "best": best, "table_md": table, "out": str(sweep)}


def sweep_rows(grid, sweep: RunDir) -> list[dict]:
    """One row per trial (a failed trial keeps its error), best score first, failures last."""
    rows = []
    for r in grid:
        if r.error or not r.metrics or "score" not in r.metrics:
            rows.append({"lr": r.config["lr"], "layernorm": r.config["layernorm"], "score": None,
                         "error": str(r.error)[:200] if r.error else "no result"})
            continue
        m = r.metrics
        rows.append({"lr": r.config["lr"], "layernorm": r.config["layernorm"], "score": m["score"],
                     "eval_loss": m["eval_loss"], "d_shuffled": m["d_shuffled"], "d_zero": m["d_zero"],
                     "d_noise": m["d_noise"], "ablation_pass": bool(m["ablation_pass"]),
                     "trial_dir": str(sweep.loc / "trials" / trial_name(r.config["lr"], r.config["layernorm"]))})
    rows.sort(key=lambda r: (r["score"] is None, r["score"] if r["score"] is not None else 0.0))
    return rows


def write_results(out: Path, rows: list[dict], vcfg: VLMConfig) -> tuple[str, Optional[dict]]:
    """results.csv / .md / .json and, when a trial scored, best_config.yaml; returns (the markdown table, best)."""
    cols = ["lr", "layernorm", "score", "eval_loss", "d_shuffled", "d_zero", "d_noise", "ablation_pass", "trial_dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols + ["error"], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    (out / "results.csv").write_text(buf.getvalue())

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) and not isinstance(v, bool) else str(v)
    md = ["| " + " | ".join(cols[:-1]) + " |", "|" + "---|" * (len(cols) - 1)]
    md += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols[:-1]) + " |" for r in rows]
    table = "\n".join(md)
    (out / "results.md").write_text(f"# VLM sweep ({len(rows)} trials, score = eval_loss - 0.1 x (d_shuffled + d_zero))\n\n{table}\n")
    best = rows[0] if rows and rows[0]["score"] is not None else None
    if best:
        bcfg = copy.deepcopy(vcfg)
        bcfg.train.lr, bcfg.vision.layernorm = float(best["lr"]), bool(best["layernorm"])
        (out / "best_config.yaml").write_text(yaml.safe_dump({"vlm": to_dict(bcfg)}, sort_keys=False))
    (out / "results.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1) + "\n")
    return table, best
