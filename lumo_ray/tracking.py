"""Run tracking for the trainers: TensorBoard event files under `<run>/tensorboard/` (always, unless
`tracking.tensorboard` is off) and MLflow when `tracking.mlflow_uri` is set (a file store path or
`file:` URI, or a tracking server URL). Rank 0 of a run owns one Tracker; Tune studies use Ray's
own callbacks instead (pipelines/ray_env.py: `study_callbacks`)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from .config import TrackingConfig


def flat_params(d: dict, prefix: str = "", limit: int = 200) -> dict[str, str]:
    """A nested config as 'a.b.c' -> str(value) (MLflow params are flat strings), at most `limit` keys."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + ".", limit))
        else:
            out[key] = str(v)[:250]
    return dict(list(out.items())[:limit])


def mlflow_uri(uri: str) -> str:
    """A bare local path becomes an absolute file: URI (MLflow reads a relative path against its cwd).
    A file store is what the user asked for: MLflow 3 refuses one unless MLFLOW_ALLOW_FILE_STORE is set."""
    if "://" in uri and not uri.startswith("file:"):
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri if uri.startswith("file:") else Path(uri).resolve().as_uri()


class Tracker:
    """log(step, metrics) to TensorBoard and MLflow; finite numbers only (a NaN loss is in metrics.json)."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig, name: str, params: Optional[dict] = None):
        self.tb = self.mlflow = None
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter  # Ray's own dependency; plain TensorBoard event files

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), flush_secs=10)
        if cfg.mlflow_uri:
            import mlflow

            mlflow.set_tracking_uri(mlflow_uri(cfg.mlflow_uri))
            mlflow.set_experiment(cfg.mlflow_experiment)
            self.mlflow = mlflow
            mlflow.start_run(run_name=f"{name}:{Path(run_dir).name}")
            mlflow.set_tags({"lumo.stage": name, "lumo.run_dir": str(run_dir)})
            if params:
                mlflow.log_params(flat_params(params))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        nums = {k: float(v) for k, v in metrics.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None and nums:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in nums.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def open_tracker(run_dir: Path, cfg: Optional[TrackingConfig], name: str, params: Optional[dict] = None,
                 rank: int = 0) -> Optional[Tracker]:
    """Rank 0's tracker (None on other ranks or when cfg is None)."""
    return Tracker(run_dir, cfg, name, params) if rank == 0 and cfg is not None else None

