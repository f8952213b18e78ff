"""Stage 0: `lumo train lm` pretrains a tiny Qwen3 on text with Ray Train and exports a HF directory."""
import json

import pytest
import torch

from lumo_ray.cli import main
from lumo_ray.codecs.text import TINY_CORPUS


def test_train_lm_cli_reports_perplexity_and_exports_hf_dir(tmp_path, ray_local):
    out = tmp_path / "lm"
    rc = main(["train", "lm", "--input", str(TINY_CORPUS), "--out", str(out), "--set", "lm.train.steps=30",
               "--set", "lm.train.eval_every=15", "--set", "lm.train.log_every=1000", "--set", "lm.seq_len=32",
               "--set", "lm.train.global_batch=8", "--set", "lm.eval_fraction=0.2",
               "--set", f"tracking.mlflow_uri={tmp_path / 'mlruns'}", "--set", "tracking.mlflow_experiment=t"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 30 and abs(m["perplexity"] - torch.tensor(m["eval_loss"]).exp().item()) < 1e-3
    assert m["loss_history"][-1] < m["loss_history"][0] - 0.5  # it learns
    assert (out / "checkpoints" / "step-0000030" / "state.pt").exists() and (out / "config.yaml").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    tok = AutoTokenizer.from_pretrained(str(out / "export"))
    assert model.config.model_type == "qwen3" and len(tok) == model.config.vocab_size == 512
    ids = torch.tensor([tok.encode("a red circle on the left", add_special_tokens=False)])
    assert torch.isfinite(model(input_ids=ids).logits).all()

    # run tracking: TensorBoard event files in the run directory, read back with TensorBoard's reader ...
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    loss = ev.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 31))
    assert [e.value for e in loss] == pytest.approx(m["loss_history"], rel=1e-6)
    assert [e.step for e in ev.Scalars("eval_loss")] == [15, 30]
    # ... and the same params and metrics in an MLflow file store
    import mlflow

    from lumo_ray.tracking import mlflow_uri

    mlflow.set_tracking_uri(mlflow_uri(str(tmp_path / "mlruns")))
    (run,) = mlflow.search_runs(experiment_names=["t"], output_format="list")
    assert run.data.params["train.steps"] == "30" and run.data.params["seq_len"] == "32"
    hist = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [h.step for h in hist] == list(range(1, 31)) and hist[-1].value == pytest.approx(m["loss_history"][-1])
    assert run.data.metrics["eval_loss"] == pytest.approx(m["eval_loss"])
