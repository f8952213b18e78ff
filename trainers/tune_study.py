"""What the token-LM Tune studies (prompt study, stage-4 study) share: the Tuner over a function
trainable with ASHA on its report rungs (`fit_study`), one trial's training (`train_trial`: in-process, or
a Ray Train run whose rank 0 scores and reports), and the results (`write_results`: results.csv / .md,
best.json and best_config.yaml in the study directory)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Optional

from lumo_ray.config import LumoConfig, dump_config
from lumo_ray.storage import locate, ray_storage

from .context import RayContext
from .tune_resources import trial_kind, trial_resources, trials_at_once


def trial_config(cfg: LumoConfig, choice: dict, apply: Callable[[LumoConfig, dict], LumoConfig], st: Any,
                 storage: str) -> tuple[LumoConfig, Path]:
    """Inside a trial: the config with its choices applied, training `st.steps` into the trial's own
    directory (one eval and checkpoint at the end, no progress lines, never resuming), written there.
    A Ray Train trial (st.num_workers) gets the study's workers / strategy in token_lm.train and its run
    directory in the study's storage (`storage`: a shared path or a URI), where workers on any node reach
    it: the config `lumo train token-lm` would run alone."""
    from ray import tune
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # trial output reaches the driver: keep it to reports
    cfg = apply(cfg, choice)
    c = cfg.token_lm
    trial_dir = Path(tune.get_context().get_trial_dir())
    c.out = str(locate(storage) / "study" / trial_dir.name / "run") if st.num_workers else str(trial_dir / "run")
    c.train.steps, c.train.eval_every, c.train.ckpt_every = st.steps, st.steps, st.steps
    c.train.log_every, c.train.resume = 10 ** 9, ""
    if st.num_workers:
        t = c.train
        t.num_workers, t.cpus_per_worker, t.use_gpu, t.accelerator_type, t.strategy = (
            st.num_workers, st.cpus_per_worker, st.use_gpu, st.accelerator_type, st.strategy)
    # the trial's tracking is Tune's (its event files and MLflow callback, study_callbacks), not a second copy
    cfg.tracking.tensorboard, cfg.tracking.mlflow_uri = False, ""
    return cfg, trial_dir


def scoring_hook(score: Callable[[Any], dict], st: Any, out: Any, placed: str, report: Callable[[dict], None]):
    """hook(step, model) for token_lm_loop: every `st.report_every` steps (and at the end) score(model),
    with where the model computed (`placed`), written to `out`/score.json (None: not here) and reported."""
    def hook(step: int, model) -> Optional[dict]:
        if step % st.report_every and step != st.steps:
            return None
        m = {"step": step, **score(model), "placement": placed}
        if out is not None:
            (out / "score.json").write_text(json.dumps(m, indent=2) + "\n")
        report(m)
        return m
    return hook


def train_trial(cfg: LumoConfig, ts: Any, st: Any, trial_dir: Path, make_score: Callable, section: str) -> None:
    """Train the trial's run, scored by make_score(cfg, ts)(model) every `st.report_every` steps (and at
    the end), each score written to score.json and reported to Tune: in-process on the device Ray gave
    the trial, or (st.num_workers) as a Ray Train run whose rank 0 scores. Its scores before the last
    reach Tune as they come (rung_reports), so ASHA can stop it; the last one once the run has ended, so
    a trial that ASHA stops at its last rung (max_t) has its run complete, its workers gone."""
    from ray import tune

    from pipelines.ray_env import placement, quiet_actor_exit, unit_device

    from .context import LocalContext
    from .launch import launch, storage_of
    from .token_lm import token_lm_loop

    quiet_actor_exit()
    dump_config(cfg, trial_dir)
    if st.num_workers:
        t = cfg.token_lm.train
        res = launch(_trial_worker, {"cfg": cfg, "ts_json": ts.to_json(), "st": st, "make_score": make_score}, t,
                     storage_of(t, cfg.token_lm.out), "token_lm", section=section, callbacks=[rung_reports(st.steps)])
        tune.report({k: v for k, v in res.metrics.items() if k != PG_KEY})  # the last step's (it checkpoints)
        return
    device, ids = unit_device()
    hook = scoring_hook(make_score(cfg, ts), st, trial_dir, placement(device, ids), tune.report)
    token_lm_loop(cfg, LocalContext(device), log=lambda *a, **k: None, hook=hook, ts=ts, eval_start=False)


# Rank 0's reports name its worker group's placement group: a trial stopped mid-run (ASHA) takes its Ray
# Train controller down with it before the controller removes the group, and Ray Train's own cleaner
# needs the dashboard's State API; the study's driver removes it then (reap_train_runs).
PG_KEY = "ray_train_placement_group"


def rung_reports(last: int):
    """Ray Train's TuneReportCallback (rank 0's reports to the trial's Tune session), but for the report of
    step `last`: the trial reports that one itself when the run has ended (train_trial)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class RungReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("step") != last:
                super().after_report(run_context, metrics, checkpoint)

    return RungReports()


def reap_train_runs():
    """A Tune callback in the study's driver: when a trial ends (done, stopped, failed), remove the
    placement group its Ray Train run reported, if the run did not remove it (see PG_KEY)."""
    from ray.tune import Callback

    class Reaper(Callback):
        def _reap(self, trial) -> None:
            from ray import PlacementGroupID
            from ray.util.placement_group import PlacementGroup, remove_placement_group

            pg = (trial.last_result or {}).get(PG_KEY)
            if pg:
                try:
                    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg)))
                except Exception:  # noqa: BLE001  removed already (the run ended) or unknown: nothing to do
                    pass

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._reap(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._reap(trial)

    return Reaper()


class TrialReports(RayContext):
    """A Ray Train worker of a trial: it reports on the trial's scoring steps only, rank 0 its score and
    its worker group's placement group (PG_KEY), so the reports the trial's Tune session gets (rank 0's)
    are those of an in-process trial (with `placement` beside them)."""
    report_every_step = True  # the loop offers every step; the scoring steps are kept below

    def __init__(self, st: Any):
        import ray

        super().__init__()
        self.every, self.steps, self.score = st.report_every, st.steps, {}
        self.pg = ray.util.get_current_placement_group()

    def report(self, metrics: dict, ckpt_dir: Optional[Path] = None) -> None:
        step = metrics["step"]
        if step % self.every == 0 or step == self.steps:
            own = {PG_KEY: self.pg.id.hex()} if self.pg is not None else {}
            super().report({**self.score, **own} if self.rank == 0 else {}, ckpt_dir)


def _trial_worker(config: dict) -> None:
    """The Ray Train worker of a trial: `lumo train token-lm`'s loop; rank 0 scores its model (every
    rank under fsdp: the scoring forwards gather the sharded layers, in step on all ranks)."""
    from lumo_ray.token_space import TokenSpace

    from .token_lm import token_lm_loop

    cfg, st = config["cfg"], config["st"]
    ts = TokenSpace.from_json(config["ts_json"])
    ctx = TrialReports(st)
    out = locate(cfg.token_lm.out).parent if ctx.rank == 0 else None  # the trial's directory in the storage

    def keep(m: dict) -> None:
        ctx.score = {k: v for k, v in m.items() if k != "placement"}  # the context adds the rank's own

    hook = scoring_hook(config["make_score"](cfg, ts), st, out, ctx.placement, keep)
    token_lm_loop(cfg, ctx, log=lambda *a, **k: None, hook=hook, ts=ts, eval_start=False)


def study_points(st: Any, axes: tuple) -> tuple[list[dict], int]:
    """num_samples distinct points of the grid over the axes, in a seeded order (random draws repeat
    points: 8 draws from a 32-point grid ran one twice), and the grid's size."""
    import itertools

    import numpy as np

    grid = list(itertools.product(*(list(getattr(st, k)) for k in axes)))
    order = np.random.default_rng(st.seed).permutation(len(grid))[: st.num_samples]
    return [dict(zip(axes, grid[int(i)])) for i in order], len(grid)


def fit_study(trial: Callable, cfg: LumoConfig, ts_json: dict, st: Any, axes: tuple, storage: str, mode: str,
              title: str, out: Path, log=print, section: str = ""):
    """Run `trial(choice, cfg, ts_json, storage)` on Ray Tune over the axes of the study config `st` (its
    config section `section`; study_points: num_samples distinct grid points, seeded; ASHA on the
    report_every rungs; as many trials at a time as the cluster holds, trials_at_once); returns the ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipelines.ray_env import quiet_tune, study_callbacks, trial_lines

    conc = trials_at_once(st, section)
    rungs = max(1, -(-st.steps // st.report_every))
    points, size = study_points(st, axes)
    log(f"{title}: {len(points)} trials (of a {size}-point grid), {min(conc, len(points))} at a time, {rungs} "
        f"reports each, {trial_kind(st)}, out {out}")
    quiet_tune()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, cfg=cfg, ts_json=ts_json, storage=storage),
                            trial_resources(st)),
        param_space={k: tune.choice(list(getattr(st, k))) for k in axes},
        # concurrency on the search algorithm: Tune ignores max_concurrent_trials beside a SearchGenerator
        tune_config=tune.TuneConfig(metric="objective", mode=mode, num_samples=len(points),
                                    search_alg=BasicVariantGenerator(points_to_evaluate=points, random_state=st.seed,
                                                                     max_concurrent=conc),
                                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=rungs,
                                                            grace_period=min(st.grace_period, rungs),
                                                            reduction_factor=st.reduction_factor)),
        run_config=tune.RunConfig(**ray_storage(storage), name="study", verbose=0,
                                  callbacks=[trial_lines(log, "objective", len(points)), reap_train_runs(),
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
