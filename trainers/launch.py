"""Launching a loop on Ray Train workers (TorchTrainer), a run's storage path, and its JSON outputs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .checkpoint import check_resume


def launch(worker_fn: Callable, loop_config: dict, t, storage: str, name: str, address: Optional[str] = None,
           keep: int | None = None, section: str = "train", callbacks: Optional[list] = None):
    """Run worker_fn(loop_config) on t.num_workers Ray Train workers (DDP) with the resources of train
    section `t` (`section` names it in a refusal); `storage` (a path or URI) is Ray's storage_path;
    callbacks: Ray Train's (a Tune trial's TuneReportCallback). Returns the Ray Train Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_env import init_ray, train_logging
    from pipelines.status import require_fit

    from lumo_ray.resources import train_resources
    from lumo_ray.storage import ray_storage

    workers = train_resources(t, section)
    check_resume(getattr(t, "resume", None))  # before Ray: a refusal is the command's one line
    init_ray(address)
    require_fit([workers])
    # Ray picks NCCL for GPU workers; a torch built without it (a CPU wheel: the workers run this same
    # install) gets gloo, so GPU ids without CUDA (a fake-GPU test cluster) still train, on CPU.
    backend = None if not workers.gpus or torch.distributed.is_nccl_available() else "gloo"
    trainer = TorchTrainer(
        worker_fn, train_loop_config=loop_config, torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=bool(workers.gpus),
                                     resources_per_worker={"CPU": workers.cpus},
                                     accelerator_type=workers.accelerator_type or None),
        run_config=RunConfig(**ray_storage(storage), name=name, failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep), logging_config=train_logging(),
                             callbacks=callbacks))
    result = trainer.fit()
    print(f"[train] {section} rank 0 computed on {(result.metrics or {}).get('placement', '?')}", flush=True)
    return result


def storage_of(t, run_dir: str | Path) -> str:
    """Ray Train's storage_path of a run: train.storage_path, else <run>/ray (a path or URI)."""
    from lumo_ray.storage import locate, resolve

    return resolve(t.storage_path) if t.storage_path else str(locate(run_dir) / "ray")


def write_json(path: Path, obj: Any) -> Path:
    from lumo_ray.storage import write_file  # temp + rename: a symlink planted at `path` is never followed

    write_file(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path
