"""VLM training: exact resume, Ray Train DDP failure restart, real images, ablation gate, CLI, sweep."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lumo_ray.cli import main
from lumo_ray.config import TrackingConfig
from lumo_ray.config.vlm import VLMConfig
from lumo_ray.data.synth import write_synth
from trainers.checkpoint import fetch_checkpoint, latest_ray_checkpoint, load_state
from trainers.context import LocalContext
from trainers.vlm import Trainee, prepare_run, run_loop, train_vlm

QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    return write_synth(tmp_path_factory.mktemp("vsyn"), 160, 0, seed=2)["llava_pretrain_dir"]


def small_cfg(data: str, out: Path, steps: int = 10) -> VLMConfig:
    cfg = VLMConfig()
    cfg.data.path, cfg.data.eval_size, cfg.data.golden_size, cfg.data.max_seq_len = data, 16, 4, 64
    cfg.llm.text_warmup_steps = 0
    t = cfg.train
    t.out, t.steps, t.global_batch, t.warmup_steps = str(out), steps, 8, 3
    t.ckpt_every, t.eval_every, t.quick_eval_size, t.log_every = 5, 0, 8, 10 ** 6
    return cfg


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_resume_5_plus_5_equals_10_straight(synth, tmp_path):
    cfg = small_cfg(synth, tmp_path / "straight")
    cfg, run = prepare_run(cfg, cfg.train.out, QUIET)
    run_loop(cfg, run, LocalContext(), log=QUIET)
    straight = losses(run)

    ckpts: list = []

    def keep(metrics, ckpt_dir):
        if ckpt_dir:
            import shutil
            ckpts.append(shutil.copytree(ckpt_dir, tmp_path / "kept" / Path(ckpt_dir).name))

    first = small_cfg(synth, tmp_path / "first")
    first.train.stop_after = 5
    first, run1 = prepare_run(first, first.train.out, QUIET)
    run_loop(first, run1, LocalContext(on_report=keep), log=QUIET)
    assert not (run1 / "export").exists() and len(ckpts) == 1
    second = small_cfg(synth, tmp_path / "second")
    second.train.resume = str(ckpts[0])
    second, run2 = prepare_run(second, second.train.out, QUIET)
    run_loop(second, run2, LocalContext(), log=QUIET)
    resumed = {**losses(run1), **losses(run2)}
    assert sorted(resumed) == list(range(1, 11)) and sorted(losses(run2)) == list(range(6, 11))
    for s in range(1, 11):
        assert abs(resumed[s] - straight[s]) <= 1e-6, (s, resumed[s], straight[s])


def test_activation_checkpointing_gives_the_same_losses(synth, tmp_path):
    """vlm.train.activation_checkpointing recomputes the frozen LLM's layers in backward: the connector
    still learns, step for step the same losses (within float rounding)."""
    runs = {}
    for on in (False, True):
        cfg = small_cfg(synth, tmp_path / f"ckpt-{on}", steps=4)
        cfg.train.activation_checkpointing = on
        cfg, run = prepare_run(cfg, cfg.train.out, QUIET)
        run_loop(cfg, run, LocalContext(), log=QUIET)
        runs[on] = losses(run)
    assert sorted(runs[True]) == [1, 2, 3, 4]
    for s in runs[False]:
        assert abs(runs[True][s] - runs[False][s]) <= 1e-5, (s, runs[True][s], runs[False][s])
    assert runs[True][4] < runs[True][1]
    cfg = small_cfg(synth, tmp_path / "probe", steps=1)
    cfg.train.activation_checkpointing = True
    cfg, run = prepare_run(cfg, cfg.train.out, QUIET)
    assert Trainee(cfg, run, LocalContext(), QUIET).model.llm.is_activation_checkpointing  # it is on


def test_ray_train_ddp_restarts_failed_worker_from_checkpoint(synth, tmp_path, ray_local, s3):
    """The run directory and the checkpoints on an object store (vlm.train.out and
    vlm.train.storage_path on a local S3 server): a SIGKILLed worker resumes from there, its logs
    continue where the URI's copy ended; a new run directory on the same storage continues the run."""
    from lumo_ray.storage import locate
    cfg = small_cfg(synth, s3("vlm/ddp_run"))
    cfg.train.fail_at_step = 7  # rank 0 is SIGKILLed once (marker file), after the step-5 checkpoint
    cfg.train.num_workers, cfg.train.max_failures = 2, 1
    cfg.train.storage_path = s3("vlm/ddp")
    res = train_vlm(cfg, log=QUIET)
    run = locate(res["run_dir"])
    assert str(run) == cfg.train.out and (run / ".failed_once").exists() and (run / "config.yaml").exists()
    rows = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10]  # restarted after step 5's checkpoint
    assert rows[5]["loss"] == pytest.approx(rows[7]["loss"], abs=1e-6)  # exact resume under DDP
    assert rows[6]["loss"] == pytest.approx(rows[8]["loss"], abs=1e-6)
    m = res["metrics"]
    assert m["final"]["step"] == 10 and m["world_size"] == 2 and res["export"] == str(run / "export")
    assert m["epochs"][0]["zero_label_pct"] == 0.0 and m["epochs"][0]["avg_label_tokens"] > 0
    assert set(m["final"]["eval_buckets"]) == {"0", "1", "2", "3"}
    gold = (run / "golden" / "step_000010.jsonl").read_text().splitlines()
    assert len(gold) == 4 and all(set(json.loads(g)) >= {"id", "reference", "generated"} for g in gold)
    last = latest_ray_checkpoint(cfg.train.storage_path)
    assert last.startswith("s3://lumo/vlm/ddp/train/checkpoint_") and not (run / "ray").exists()
    assert not (run / "checkpoints").exists()  # checkpoints reach the bucket through storage_path only
    st = load_state(fetch_checkpoint(last))
    assert st["step"] == 10 and len(st["rng"]) == 2 and {"optimizer", "scheduler", "data_position", "config"} <= set(st)

    abl = locate(s3("vlm/abl"))
    code = main(["eval", "vlm-ablation", "--run", str(run), "--out", str(abl), "--n", "16", "--allow-small-n"])
    rep = json.loads((abl / "ablation.json").read_text())
    assert code == 1 and rep["n"] == 16 and not rep["gating"]  # under 64 samples the report does not gate

    # A fresh run directory on the same storage_path: Ray Train restores step 10 from the object store.
    more = small_cfg(synth, tmp_path / "ddp_more", steps=12)
    more.train.num_workers, more.train.storage_path = 2, cfg.train.storage_path
    res2 = train_vlm(more, log=QUIET)
    assert sorted(losses(Path(res2["run_dir"]))) == [11, 12] and res2["metrics"]["final"]["step"] == 12


@pytest.fixture(scope="module")
def gate_synth(tmp_path_factory) -> str:
    """The demo's VLM data size: 448 images, 224 of them held out (lumo_ray/cli/demo/vlm.py)."""
    from lumo_ray.config import DemoConfig
    return write_synth(tmp_path_factory.mktemp("vgate"), DemoConfig().vlm_images, 0, seed=0)["llava_pretrain_dir"]


def _gate_run(synth, out: Path, steps: int):
    """The demo's VLM settings (lumo_ray/cli/demo/vlm.py) in-process, with `steps` of connector training."""
    from lumo_ray.cli.demo.vlm import demo_config
    cfg = demo_config(out, Path(synth))
    cfg.train.out = str(out)
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.eval_every = steps, steps, 0
    cfg.train.warmup_steps, cfg.train.log_every = min(cfg.train.warmup_steps, steps), 10 ** 6
    cfg, run = prepare_run(cfg, cfg.train.out, QUIET)
    run_loop(cfg, run, LocalContext(), log=QUIET, tracking=TrackingConfig())
    return run


def test_trained_tiny_vlm_passes_ablation(gate_synth, tmp_path):
    from lumo_ray.eval.vlm_ablation import ablation_from_export
    run = _gate_run(gate_synth, tmp_path / "gate", 200)
    rep = ablation_from_export(run / "export", run / "splits.json", n=256, seed=0)
    assert rep["n"] == 224 and rep["gating"]
    assert rep["pass"], (rep["mean_loss"], rep["stats"])
    assert all(rep["stats"][m]["gap"] > 0 and rep["stats"][m]["p"] < 0.01 for m in rep["stats"])
    # run tracking: every step's loss and the final eval as TensorBoard scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tensorboard"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("loss")] == list(range(1, 201)) and [e.step for e in ev.Scalars("eval_loss")] == [200]


def test_untrained_connector_fails_ablation(gate_synth, tmp_path):
    """The same setup with one connector step: the image is not read, so the gate fails (its shuffled
    comparison most of all), and the CLI exits 1."""
    from lumo_ray.eval.vlm_ablation import ablation_from_export
    run = _gate_run(gate_synth, tmp_path / "untrained", 1)
    rep = ablation_from_export(run / "export", run / "splits.json", n=256, seed=0)
    assert rep["n"] == 224 and rep["gating"] and not rep["pass"]
    assert not rep["checks"]["shuffled"], rep["stats"]["shuffled"]
    assert main(["eval", "vlm-ablation", "--run", str(run), "--out", str(tmp_path / "abl")]) == 1


def test_real_llava_images_train_and_evaluate(real_data, tmp_path):
    cfg = small_cfg(str(real_data / "llava_pretrain"), tmp_path / "real", steps=3)
    cfg.data.eval_size, cfg.data.bucket_edges = 8, [12, 18, 24]
    cfg.train.ckpt_every = 3
    cfg, run = prepare_run(cfg, cfg.train.out, QUIET)
    final = run_loop(cfg, run, LocalContext(), log=QUIET)
    assert final["step"] == 3 and final["eval_loss"] > 0
    from lumo_ray.eval.vlm_ablation import ablation_from_export
    rep = ablation_from_export(run / "export", run / "splits.json", n=8, seed=0, allow_small_n=True)
    assert rep["n"] == 8 and all(v > 0 for v in rep["mean_loss"].values()) and not rep["gating"]


def test_sweep_runs_four_trials_in_separate_dirs(synth, tmp_path, ray_local, s3):
    """The sweep directory on an object store: each trial stages its run directory and uploads it."""
    from trainers.tune_vlm import run_sweep
    from lumo_ray.storage import locate
    cfg = small_cfg(synth, tmp_path / "unused", steps=6)
    cfg.sweep.out, cfg.sweep.steps, cfg.sweep.ablation_n = s3("vlm/sweep"), 6, 16
    cfg.llm.text_warmup_steps = 3  # runs once in the driver; the trials download it from the sweep directory
    rep = run_sweep(cfg, log=QUIET)
    out = locate(rep["out"])
    assert str(out) == cfg.sweep.out
    assert len(rep["rows"]) == 4 and all(r["score"] is not None for r in rep["rows"])
    dirs = {r["trial_dir"] for r in rep["rows"]}
    assert len(dirs) == 4 and all((locate(d) / "export" / "model.safetensors").exists() for d in dirs)
    assert all((locate(d) / "ablation.json").exists() for d in dirs)
    warm = str(out / "shared" / "llm_text_warm")
    assert (locate(warm) / "config.json").exists()
    assert all(yaml.safe_load((locate(d) / "config.yaml").read_text())["vlm"]["llm"]["model"] == warm for d in dirs)
    # An export names the warm-up by URI, so it loads after the sweep, from the run or its export/
    best = locate(rep["best"]["trial_dir"])
    assert json.loads((best / "export" / "config.json").read_text())["frozen"]["llm"]["model"] == warm
    for run in (best, best / "export"):
        code = main(["eval", "vlm-ablation", "--run", str(run), "--out", str(tmp_path / run.name), "--n", "8",
                     "--allow-small-n"])
        rep_run = json.loads((tmp_path / run.name / "ablation.json").read_text())
        assert code == 1 and rep_run["n"] == 8 and not rep_run["gating"]
    assert (out / "results.csv").read_text().count("\n") == 5 and (out / "results.md").exists()
    assert (out / "best_config.yaml").exists() and rep["best"]["score"] == min(r["score"] for r in rep["rows"])
    # each trial's TensorBoard events, written by Ray Tune's logger into the sweep's Tune storage
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lumo_ray.storage import download_dir

    scores = []
    tb = download_dir(out / "ray" / "tune", tmp_path / "tune_storage")
    for d in sorted({p.parent for p in tb.rglob("events.out.tfevents*")}):
        ev = EventAccumulator(str(d))
        ev.Reload()
        scores.append(ev.Scalars("ray/tune/score")[-1].value)
    assert sorted(scores) == pytest.approx(sorted(r["score"] for r in rep["rows"]))
