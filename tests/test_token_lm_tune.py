"""`lumo tune prompts`: a 2-trial Ray Tune study writes its table and names a best config; Tune's
study directory and Tune's storage (experiment state, trial directories) on an object store (a local
S3 server)."""
import csv
import hashlib
import io
import json
import os
from pathlib import Path

import yaml

from lumo_ray.config import LumoConfig, load_config
from pipelines.synth_shards import build_synth_shards
from lumo_ray.storage import locate, runs_root
from trainers.tune_prompts import run_prompt_study


def test_two_trial_prompt_study(tmp_path_factory, tmp_path, ray_local, s3):
    root = Path(os.environ.get("LUMO_LM_TEST_DATA") or tmp_path_factory.getbasetemp() / "lm_synth12_e400")
    shards, _, _ = build_synth_shards(root, 12, 12, overrides=["data.normalize.eval_permille=400"], log=lambda *a: None)
    cfg = load_config(LumoConfig, None, [
        f"token_lm.shards={shards}", "token_lm.train.global_batch=4", "token_lm.seq.max_audio_tokens=60",
        "token_lm.prompt_study.num_samples=2", "token_lm.prompt_study.steps=4", "token_lm.prompt_study.report_every=2",
        "token_lm.prompt_study.ablation_n=4", "token_lm.prompt_study.max_audio_tokens=[40, 60]",
        f"token_lm.prompt_study.out={s3('tune/p')}",  # storage_path defaults to the study directory
        f"tracking.mlflow_uri={tmp_path / 'mlruns'}", "tracking.mlflow_experiment=prompts"])
    res = run_prompt_study(cfg, log=lambda *a: None)
    out = locate(s3("tune/p"))
    assert res["out"] == str(out)
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 2 and all(r["text_invariance"] == "True" for r in rows)
    assert res["best"]["objective"] == max(float(r["objective"]) for r in rows)
    # 4-step trials do not read their media: a best config is named, but the study fails its verdict
    assert res["best"]["ablation_pass"] is False and not res["pass"]
    assert "**verdict**: FAIL" in (out / "results.md").read_text()
    best = yaml.safe_load((out / "best_config.yaml").read_text())["token_lm"]
    assert best["seq"]["instruction"] == res["best"]["instruction"] and best["new_row_lr"] == res["best"]["new_row_lr"]
    assert "best" in (out / "results.md").read_text()
    # each trial's directory (config, score.json, run/) was synced to the object store
    trial_dirs = {r["dir"] for r in rows}
    assert len(trial_dirs) == 2 and all(d.startswith("s3://lumo/tune/p/study/") for d in trial_dirs)
    for r in rows:
        score = json.loads((locate(r["dir"]) / "score.json").read_text())
        assert score["objective"] == float(r["objective"]) and (locate(r["dir"]) / "config.yaml").exists()
    # each trial's TensorBoard events (Ray Tune's logger) came back with its directory, and MLflow has
    # a run per trial with its config and the objective it reported
    import mlflow
    import pytest
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lumo_ray.tracking import mlflow_uri

    from lumo_ray.storage import download_dir

    for i, r in enumerate(rows):
        ev = EventAccumulator(str(download_dir(r["dir"], tmp_path / f"trial{i}")))
        ev.Reload()
        assert ev.Scalars("ray/tune/objective")[-1].value == pytest.approx(float(r["objective"]))
    mlflow.set_tracking_uri(mlflow_uri(str(tmp_path / "mlruns")))
    runs = mlflow.search_runs(experiment_names=["prompts"], output_format="list")
    assert len(runs) == 2 and all("new_row_lr" in r.data.params for r in runs)
    assert sorted(r.data.metrics["objective"] for r in runs) == pytest.approx(sorted(float(r["objective"]) for r in rows))
    key = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    assert runs_root().is_dir() and not list(runs_root().glob(f"{key}-*"))  # the driver's staging copy is gone


def test_trial_lines_callback_pickles_without_its_log():
    """Tune pickles its callbacks into the study state: a log function that cannot be pickled (the
    demo's print once Ray Train has patched builtins.print; here one holding a lock) stays out of it."""
    import threading
    from types import SimpleNamespace

    from ray import cloudpickle

    from pipelines.ray_env import trial_lines

    lock, lines = threading.Lock(), []

    def log(s):
        with lock:
            lines.append(s)

    cb = trial_lines(log, "objective", 2)
    cb.on_trial_complete(0, [], SimpleNamespace(trial_id="t1", last_result={"objective": 0.5, "training_iteration": 2,
                                                                            "time_total_s": 3.0}))
    assert lines == ["  trial 1/2 done: t1 objective 0.5 after 2 report(s), 3 s"]
    back = cloudpickle.loads(cloudpickle.dumps(cb))
    assert back.log is print and (back.done, back.metric, back.total) == (1, "objective", 2)
