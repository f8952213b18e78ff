"""Tune trials that train like real runs (trainers/tune_study.py, trainers/tune_vlm.py): a trial trains
in-process on what it reserved, or launches the Ray Train run `lumo train` would launch with the study's
num_workers / use_gpu / strategy, whose rank 0 scores and reports to Tune. On the session's fake-GPU Ray
(conftest: 2 GPUs) a GPU trial gets a GPU id from Ray and computes on CPU, so it must reach its CPU twin's
numbers; a request beyond the 2 GPUs is refused before any trial starts (exit 2, one line)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines.synth_shards import build_synth_shards
from lumo_ray.config import LumoConfig, load_config, to_dict
from trainers.mmpt import MMPT_DEFAULTS
from test_gpu_requests import refused

QUIET = lambda *a, **k: None  # noqa: E731
P, M = "token_lm.prompt_study.", "token_lm.mmpt.study."


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    root = Path(os.environ.get("LUMO_LM_TEST_DATA") or tmp_path_factory.getbasetemp() / "lm_synth12_e400")
    return build_synth_shards(root, 12, 12, overrides=["data.normalize.eval_permille=400"], log=QUIET)[0]


def prompt_cfg(shards, out: Path, *extra: str) -> LumoConfig:
    """A 2-trial prompt study of 4-step trials, reporting at steps 2 and 4."""
    return load_config(LumoConfig, None, [
        f"token_lm.shards={shards}", "token_lm.train.global_batch=4", "token_lm.seq.max_audio_tokens=60",
        P + "num_samples=2", P + "steps=4", P + "report_every=2", P + "ablation_n=4", P + "max_audio_tokens=[40, 60]",
        P + f"out={out}", *extra])


def mmpt_cfg(shards, out: Path, *extra: str) -> LumoConfig:
    """A 2-trial stage-4 study of 4-step trials (warm start from token_lm.base), reporting at steps 2 and 4."""
    return load_config(LumoConfig, None, [
        f"token_lm.shards={shards}", "token_lm.train.global_batch=4", "token_lm.train.warmup_steps=2",
        "token_lm.seq.instruction=templates", "token_lm.mmpt.ramp_steps=0", "token_lm.ablation.n=4",
        M + "num_samples=2", M + "steps=4", M + "report_every=2", M + "n=4", M + f"out={out}", *extra],
        defaults=MMPT_DEFAULTS)


def settled(timeout: float = 30.0) -> None:
    """Every CPU and GPU of the session's Ray is free again (a finished run releases them in a moment)."""
    import time

    import ray

    total = {k: ray.cluster_resources().get(k, 0.0) for k in ("CPU", "GPU")}
    deadline = time.time() + timeout
    while {k: ray.available_resources().get(k, 0.0) for k in total} != total:
        assert time.time() < deadline, f"resources still held: {ray.available_resources()} of {total}"
        time.sleep(0.5)


def test_trials_at_once_follow_the_study_keys_and_a_trial_too_big_is_refused(ray_local):
    """One trial's groups (lumo status prints them; the pre-launch check refuses them) and how many trials
    the session's Ray (2 CPUs, 2 GPUs) holds at once, from the study section's keys alone."""
    from lumo_ray.config.lm import PromptStudyConfig
    from lumo_ray.errors import UserError
    from lumo_ray.resources import study_resources
    from trainers.tune_resources import trial_resources, trials_at_once

    study = PromptStudyConfig
    inproc = study(gpus_per_trial=1.0, accelerator_type="A100")
    (g,) = study_resources(inproc, "s")
    assert (g.what, g.count, g.cpus, g.gpus, g.gpus_key) == ("s trials", 1, 1.0, 1.0, "gpus_per_trial")
    assert trial_resources(inproc) == {"cpu": 1.0, "gpu": 1.0, "accelerator_type:A100": 0.001}
    train = study(num_workers=2, use_gpu=True, cpus_per_worker=0.25, cpus_per_trial=0.25)
    assert [(g.what, g.count, g.cpus, g.gpus) for g in study_resources(train, "s")] == [
        ("s trials", 1, 0.25, 0.0), ("s trial workers", 2, 0.25, 1.0)]
    assert trial_resources(train) == {"cpu": 0.25}  # the workers reserve theirs when the run starts
    assert trials_at_once(study(), "s") == 2 and trials_at_once(study(gpus_per_trial=1.0), "s") == 2
    assert trials_at_once(train, "s") == 1  # 2 workers x 1 GPU: the cluster's 2 GPUs
    assert trials_at_once(study(num_workers=2, cpus_per_worker=0.25, cpus_per_trial=0.25), "s") == 2
    with pytest.raises(UserError, match=r"^s\.num_workers: one trial takes 3 CPUs at once \(cpus_per_trial \+ "
                                        r"num_workers x cpus_per_worker\), the cluster has 2; lower them"):
        trials_at_once(study(num_workers=2), "s")
    with pytest.raises(UserError, match=r"^s\.use_gpu: 3 x 1 GPU = 3 GPUs asked \(s trial workers\), the "
                                        r"cluster has 2; lower it or s\.num_workers"):
        trials_at_once(study(num_workers=3, use_gpu=True, cpus_per_worker=0.25, cpus_per_trial=0.25), "s")


def test_the_driver_removes_the_placement_group_of_a_trial_stopped_mid_run(ray_local):
    """ASHA stops a trial while its Ray Train run works: the trial's process ends and takes the run's
    controller with it before the controller removes its workers' placement group (Ray Train's own
    cleaner needs the dashboard's State API). The study's driver removes the group rank 0 reported."""
    from types import SimpleNamespace

    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from trainers.tune_study import PG_KEY, reap_train_runs

    pg = placement_group([{"CPU": 0.25}, {"CPU": 0.25}])
    ray.get(pg.ready())
    reaper = reap_train_runs()
    reaper.on_trial_complete(0, [], SimpleNamespace(last_result={"objective": 1.0, PG_KEY: pg.id.hex()}))
    assert placement_group_table(pg)["state"] == "REMOVED"
    reaper.on_trial_error(0, [], SimpleNamespace(last_result={PG_KEY: pg.id.hex()}))  # removed already: a no-op
    reaper.on_trial_complete(0, [], SimpleNamespace(last_result=None))  # an in-process trial: nothing to remove
    settled()


def test_ray_train_trials_reach_the_losses_of_the_same_runs_alone(shards, tmp_path, ray_local):
    """A stage-4 study of 2-worker DDP trials and a prompt study of 2-worker FSDP trials, on CPU: each
    trial's rank 0 reports at each rung (what ASHA acts on: steps 2 and 4 in the stage-4 study, step 4 in
    the prompt study, whose sharded scoring costs more), and a trial's run has, step for step, the
    losses of its own config (the config.yaml in the trial's directory) run by `lumo train token-lm`
    (its own Ray Train run, outside Tune; a study's while the next study runs): the first trial of each
    study, as every trial's config and score are checked (each run alone is one more Ray Train run)."""
    import ray

    from trainers.tune_mmpt import run_mmpt_study
    from trainers.tune_prompts import run_prompt_study

    @ray.remote(num_cpus=0)
    def alone(cfg: LumoConfig) -> dict:
        from trainers.token_lm import run_token_lm

        return run_token_lm(cfg, log=lambda *a: None)

    # 2 trials at a time (each 0.25 CPU for itself, 2 x 0.25 for its CPU workers); no ASHA stop before
    # the last rung, so that every run trains all its steps
    train = ["num_workers=2", "cpus_per_worker=0.25", "cpus_per_trial=0.25", "grace_period=2"]
    studies = (("ddp", run_mmpt_study, mmpt_cfg, M, 2), ("fsdp", run_prompt_study, prompt_cfg, P, 4))
    trials = []
    for strategy, run, make, pre, every in studies:
        rows = run(make(shards, tmp_path / strategy, *(pre + k for k in train), pre + f"strategy={strategy}",
                        pre + f"report_every={every}"), log=QUIET)["trials"]
        assert len(rows) == 2 and all(r["error"] == "" and r["reports"] == 4 // every for r in rows), rows
        if not trials:  # every trial's run is gone (with runs alone under way: checked at the end)
            settled()
        for r in rows:
            cfg = load_config(LumoConfig, Path(r["dir"]) / "config.yaml")
            t = cfg.token_lm.train
            assert (t.num_workers, t.strategy, t.use_gpu, cfg.token_lm.out) == (2, strategy, False, r["dir"] + "/run")
            score = json.loads((Path(r["dir"]) / "score.json").read_text())
            assert score["step"] == 4 and score["objective"] == r["objective"]
            assert score["placement"] == "cpu (Ray GPU ids none)"
            if r is rows[0]:
                cfg.token_lm.out = str(tmp_path / "alone" / Path(r["dir"]).name)
                trials.append((json.loads((Path(r["dir"]) / "run" / "metrics.json").read_text()), alone.remote(cfg)))
    for trial, ref in trials:
        run_alone = ray.get(ref)
        assert len(trial["loss_history"]) == 4
        assert trial["loss_history"] == pytest.approx(run_alone["loss_history"], abs=1e-6, rel=0)
        assert trial["eval_loss"] == pytest.approx(run_alone["eval_loss"], abs=1e-6, rel=0)
    settled()


def cpu_trial(row: dict, study: str, tmp: Path) -> dict:
    """The trial of a study row trained and scored again on CPU in this process, outside Tune: its config
    (the trial directory's config.yaml) through the loop and scoring an in-process trial runs."""
    from trainers.context import LocalContext
    from trainers.token_lm import run_token_space, token_lm_loop
    from trainers.tune_study import scoring_hook

    make_score = __import__(f"trainers.tune_{study}", fromlist=["make_score"]).make_score
    cfg = load_config(LumoConfig, Path(row["dir"]) / "config.yaml")
    st = cfg.token_lm.prompt_study if study == "prompts" else cfg.token_lm.mmpt.study
    cfg.token_lm.out = str(tmp / Path(row["dir"]).name)
    ts = run_token_space(cfg)
    got: dict = {}
    token_lm_loop(cfg, LocalContext(), log=QUIET, ts=ts, eval_start=False,
                  hook=scoring_hook(make_score(cfg, ts), st, None, "cpu", got.update))
    return got


@pytest.mark.parametrize("study", ["prompts", "mmpt"])
def test_token_lm_study_trials_get_their_gpu_and_the_cpu_verdict(study, shards, tmp_path, ray_local, capsys,
                                                                 monkeypatch):
    """An in-process trial with gpus_per_trial 1 gets a GPU id from Ray and, computing on CPU, reports what
    its config trained on CPU outside Tune reports, so the study's verdict is the CPU run's. 3 GPUs per
    trial, or 3 Ray Train workers with a GPU each, are refused before any trial starts."""
    from trainers.tune_mmpt import run_mmpt_study
    from trainers.tune_prompts import run_prompt_study

    make, run, pre, cmd = ((prompt_cfg, run_prompt_study, P, "prompts") if study == "prompts"
                           else (mmpt_cfg, run_mmpt_study, M, "mmpt"))
    res = run(make(shards, tmp_path / "gpu", pre + "gpus_per_trial=1", pre + "num_samples=1", pre + "steps=2",
                   pre + "report_every=2"), log=QUIET)
    (row,) = res["trials"]
    (placed,) = placements(res)
    assert placed.startswith("cpu (Ray GPU ids ") and "none" not in placed, placed
    cpu = cpu_trial(row, study, tmp_path / "cpu")
    assert row["objective"] == pytest.approx(cpu["objective"], abs=1e-6, rel=0)
    if study == "prompts":  # a best trial keeps text invariance; the study passes when it also reads its media
        best, verdict = cpu["text_invariance"] and cpu["objective"] > -1, cpu["ablation_pass"]
    else:  # the best trial is a feasible one, and the study passes when there is one
        best = verdict = cpu["feasible"]
    assert (res["best"] is not None) == best and res["pass"] == (best and verdict)

    import ray.tune

    monkeypatch.setattr(ray.tune, "Tuner", lambda *a, **k: pytest.fail("a study was started"))
    argv = ["tune", cmd, "--set", f"token_lm.shards={shards}", "--out", str(tmp_path / "over")]
    refused(capsys, argv + ["--set", pre + "gpus_per_trial=3"], pre + "gpus_per_trial")
    refused(capsys, argv + ["--set", pre + "num_workers=3", "--set", pre + "use_gpu=true"], pre + "use_gpu")


def placements(res: dict) -> list[str]:
    """Where each trial of a token-LM study computed (its score.json)."""
    return [json.loads((Path(r["dir"]) / "score.json").read_text())["placement"] for r in res["trials"]]


def sweep_placements(out: Path) -> dict[str, str]:
    """Where each trial of a VLM sweep computed: its last Tune report (the sweep's Tune storage, <out>/ray)."""
    found = {}
    for f in sorted((out / "ray" / "tune").glob("*/result.json")):
        last = json.loads(f.read_text().splitlines()[-1])
        found[f"lr{last['config']['lr']:g}_ln{int(last['config']['layernorm'])}"] = last["placement"]
    return found


def test_vlm_sweep_trials_get_their_gpu_and_the_cpu_verdict(tmp_path_factory, tmp_path, ray_local, capsys,
                                                            monkeypatch):
    """A VLM sweep's trial as a 1-worker Ray Train run with a GPU (an in-process GPU trial takes the same
    path as the token-LM studies' above): its worker gets a GPU id from Ray, and the sweep the score its
    config gets on CPU in this process, outside Tune. 3 GPUs per trial are refused before the driver's
    warm-up or any trial."""
    import yaml

    from lumo_ray.config import build
    from lumo_ray.config.vlm import VLMConfig
    from lumo_ray.data.synth import write_synth
    from test_vlm_train import small_cfg
    from trainers.context import LocalContext
    from trainers.tune_vlm import run_sweep, score_run
    from trainers.vlm import prepare_run, run_loop

    data = write_synth(tmp_path_factory.mktemp("vsyn_gpu"), 48, 0, seed=2)["llava_pretrain_dir"]

    def sweep(name: str, **keys) -> dict:
        cfg = small_cfg(data, tmp_path / "unused", steps=2)
        cfg.sweep.out, cfg.sweep.steps, cfg.sweep.ablation_n = str(tmp_path / name), 2, 8
        cfg.sweep.lrs, cfg.sweep.layernorm = [1e-3], [True]
        for k, v in keys.items():
            setattr(cfg.sweep, k, v)
        (row,) = run_sweep(cfg, log=QUIET)["rows"]
        (placed,) = sweep_placements(tmp_path / name).values()
        assert placed.startswith("cpu (Ray GPU ids ") and "none" not in placed, placed
        return row

    row = sweep("train", num_workers=1, use_gpu=True, cpus_per_trial=0.5)
    cfg = build(VLMConfig, yaml.safe_load((Path(row["trial_dir"]) / "config.yaml").read_text())["vlm"])
    assert (cfg.train.num_workers, cfg.train.use_gpu) == (1, True)  # the run `lumo train vlm` would launch
    cfg.train.out = str(tmp_path / "cpu")
    cfg, run = prepare_run(cfg, cfg.train.out, log=QUIET)
    cpu = score_run(cfg, run, run_loop(cfg, run, LocalContext(), log=QUIET), 8)
    assert row["score"] == pytest.approx(cpu["score"], abs=1e-6, rel=0)
    assert row["ablation_pass"] == bool(cpu["ablation_pass"])

    import ray.tune

    monkeypatch.setattr(ray.tune, "Tuner", lambda *a, **k: pytest.fail("a sweep was started"))
    over = small_cfg(data, tmp_path / "unused", steps=2)
    over.sweep.out = str(tmp_path / "over")
    (tmp_path / "over.yaml").write_text(yaml.safe_dump({"vlm": to_dict(over)}))
    refused(capsys, ["tune", "vlm", "--config", str(tmp_path / "over.yaml"), "--set", "vlm.sweep.gpus_per_trial=3"],
            "vlm.sweep.gpus_per_trial")
    assert not (tmp_path / "over" / "shared").exists()  # refused before the driver's warm-up
