"""What the token-LM Tune studies (prompt study, stage-4 study) share: the Tuner over a function
trainable with ASHA on its report rungs (`fit_study`), and the results (`write_results`: results.csv /
.md, best.json and best_config.yaml in the study directory)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Optional

from lumo_ray.config import LumoConfig, dump_config
from lumo_ray.storage import ray_storage


def trial_config(cfg: LumoConfig, choice: dict, apply: Callable[[LumoConfig, dict], LumoConfig], st: Any
                 ) -> tuple[LumoConfig, Path]:
    """Inside a trial: the config with its choices applied, training `st.steps` into the trial's own
    directory (one eval and checkpoint at the end, no progress lines, never resuming), written there."""
    from ray import tune
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # trial output reaches the driver: keep it to reports
    cfg = apply(cfg, choice)
    c = cfg.token_lm
    trial_dir = Path(tune.get_context().get_trial_dir())
    c.out = str(trial_dir / "run")
    c.train.steps, c.train.eval_every, c.train.ckpt_every = st.steps, st.steps, st.steps
    c.train.log_every, c.train.resume = 10 ** 9, ""
    # the trial's tracking is Tune's (its event files and MLflow callback, study_callbacks), not a second copy
    cfg.tracking.tensorboard, cfg.tracking.mlflow_uri = False, ""
    return cfg, trial_dir


def train_trial(cfg: LumoConfig, ts: Any, st: Any, trial_dir: Path, score: Callable[[Any], dict]) -> None:
    """Train the trial's run in-process; every `st.report_every` steps (and at the end) score(model) is
    written to score.json and reported to Tune."""
    from ray import tune

    from pipelines.ray_env import quiet_actor_exit

    from .core import LocalContext
    from .token_lm import token_lm_loop

    quiet_actor_exit()
    dump_config(cfg, trial_dir)

    def hook(step: int, model) -> Optional[dict]:
        if step % st.report_every and step != st.steps:
            return None
        m = {"step": step, **score(model)}
        (trial_dir / "score.json").write_text(json.dumps(m, indent=2) + "\n")
        tune.report(m)
        return m

    token_lm_loop(cfg, LocalContext(), log=lambda *a, **k: None, hook=hook, ts=ts, eval_start=False)


def study_points(st: Any, axes: tuple) -> tuple[list[dict], int]:
    """num_samples distinct points of the grid over the axes, in a seeded order (random draws repeat
    points: 8 draws from a 32-point grid ran one twice), and the grid's size."""
    import itertools

    import numpy as np

    grid = list(itertools.product(*(list(getattr(st, k)) for k in axes)))
    order = np.random.default_rng(st.seed).permutation(len(grid))[: st.num_samples]
    return [dict(zip(axes, grid[int(i)])) for i in order], len(grid)


def fit_study(trial: Callable, cfg: LumoConfig, ts_json: dict, st: Any, axes: tuple, storage: str, mode: str,
              title: str, out: Path, log=print):
    """Run `trial(choice, cfg, ts_json)` on Ray Tune over the axes of the study config `st`
    (study_points: num_samples distinct grid points, seeded; ASHA on the report_every rungs;
    concurrency = cluster CPUs / cpus_per_trial); returns the ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipelines.ray_env import quiet_tune, study_callbacks, trial_lines

    cpus = float(ray.cluster_resources().get("CPU", 1))
    conc = max(1, int(cpus // st.cpus_per_trial))
    rungs = max(1, -(-st.steps // st.report_every))
    points, size = study_points(st, axes)
    log(f"{title}: {len(points)} trials (of a {size}-point grid), {conc} at a time, {rungs} reports each, out {out}")
    quiet_tune()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, cfg=cfg, ts_json=ts_json), {"cpu": st.cpus_per_trial}),
        param_space={k: tune.choice(list(getattr(st, k))) for k in axes},
        # concurrency on the search algorithm: Tune ignores max_concurrent_trials beside a SearchGenerator
        tune_config=tune.TuneConfig(metric="objective", mode=mode, num_samples=len(points),
                                    search_alg=BasicVariantGenerator(points_to_evaluate=points, random_state=st.seed,
                                                                     max_concurrent=conc),
                                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=rungs,
                                                            grace_period=min(st.grace_period, rungs),
                                                            reduction_factor=st.reduction_factor)),
        run_config=tune.RunConfig(**ray_storage(storage), name="study", verbose=0,
                                  callbacks=[trial_lines(log, "objective", len(points)),
                                             *study_callbacks(cfg.tracking, title)]))
    return tuner.fit()


def write_results(rows: list[dict], best: Optional[dict], cfg: LumoConfig, out: Path, axes: tuple,
                  apply: Callable[[LumoConfig, dict], LumoConfig], log=print, name: str = "", title: str = "Study",
                  rule: str = "", none: str = "no trial qualified") -> dict:
    """rows: one per trial, best first; best: the chosen row or None. `name` (the study's path or URI)
    is what the log line names; `apply` writes a choice into a config (best_config.yaml)."""
    name = name or str(out)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    show = [k for k in keys if k not in ("dir", "error")]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    md = ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    md += ["| " + " | ".join(fmt(r.get(k, "")) for k in show) + " |" for r in rows]
    head = f"# {title}: {len(rows)} trials\n\n{rule}\n\n"
    head += (f"**best**: {best['trial']} objective {best['objective']:.4g}: "
             + ", ".join(f"{k}={best[k]}" for k in axes) + "\n\n") if best else f"**{none}**\n\n"
    (out / "results.md").write_text(head + "\n".join(md) + "\n")
    (out / "best.json").write_text(json.dumps({"best": best, "n_trials": len(rows)}, indent=2, default=str) + "\n")
    if best:
        dump_config(apply(cfg, {k: best[k] for k in axes}), out, "best_config.yaml")
        log(f"{title.lower()} best: {best['trial']} objective {best['objective']:.4f} ("
            + ", ".join(f"{k}={best[k]}" for k in axes) + f"); results in {name} (results.md)")
    else:
        log(f"{title.lower()}: {none}; results in {name} (results.md)")
    return {"pass": best is not None, "best": best, "trials": rows, "out": str(out)}
