"""The worker context a training loop runs in: one process (`LocalContext`: tests, Tune trials,
benchmarks, notebooks) or a Ray Train worker (`RayContext`); the only Ray a loop touches is here
and in trainers/launch.py."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .checkpoint import SHARDS, fetch_checkpoint, latest_ray_checkpoint, rank_files
from .fsdp import shard, single_process_group


class LocalContext:
    """One process, no Ray: tests, Tune trials, benchmarks and notebooks. on_report(metrics, ckpt_dir)
    sees every report (a Tune trial forwards them; a test keeps checkpoints)."""
    rank, world_size = 0, 1
    report_every_step = True

    def __init__(self, device: str | torch.device = "cpu", checkpoint: Optional[Path] = None,
                 on_report: Callable | None = None):
        self.device = torch.device(device)
        self._ckpt = checkpoint
        self.on_report = on_report

    def prepare(self, model: torch.nn.Module, strategy: str = "ddp", bf16: bool = False,
                forward_methods: tuple[str, ...] = ()) -> torch.nn.Module:
        if strategy == "fsdp":
            single_process_group()
            return shard(model, self.device, bf16, forward_methods)
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def report(self, metrics: dict, ckpt_dir: Optional[Path] = None) -> None:
        if self.on_report:
            self.on_report(metrics, ckpt_dir)

    def restored_checkpoint(self) -> Optional[Path]:
        return self._ckpt

    def sync(self) -> None:
        """Make the run directory durable where it lives (nothing to do in one local process)."""


class RayContext(LocalContext):
    """Inside a Ray Train worker: DDP via prepare_model, reports on every rank. storage: the run's Ray
    storage_path, where a restarted worker finds the last persisted checkpoint when Ray hands it none;
    run: a URI run directory's staging copy (storage.RunDir), which rank 0 pushes before each checkpoint."""

    # A Ray Train report costs a round trip through the controller: report on log/eval/checkpoint
    # steps only (the same steps on every rank), not on every step.
    report_every_step = False

    def __init__(self, storage: str | None = None, run: Any = None):
        import ray.train
        import ray.train.torch

        from pipelines.ray_env import placement, quiet_actor_exit, quiet_train_worker, unit_device

        quiet_train_worker()
        quiet_actor_exit()
        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        # the device follows the GPU Ray gave the worker, and falls back to CPU where CUDA is absent
        # (ray.train.torch.get_device() would name cuda for a GPU this torch cannot use)
        self.device, ids = unit_device()
        self.placement = placement(self.device, ids)  # in every report: launch() names it at the end
        self.storage, self.run = storage, run

    def prepare(self, model: torch.nn.Module, strategy: str = "ddp", bf16: bool = False,
                forward_methods: tuple[str, ...] = ()) -> torch.nn.Module:
        import ray.train.torch

        if strategy == "fsdp":
            return shard(model, self.device, bf16, forward_methods)
        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def report(self, metrics: dict, ckpt_dir: Optional[Path] = None) -> None:
        from ray.train import Checkpoint

        view = None  # a sharded checkpoint: every rank reports its own files, Ray Train merges them
        if ckpt_dir is not None and (self.rank == 0 or (ckpt_dir / SHARDS).is_dir()):
            view = rank_files(Path(ckpt_dir), self.rank)
            # logs first: a restart resumes from this checkpoint and continues the logs it pulls
            self.sync()
        self._train.report({**metrics, "placement": self.placement},
                           checkpoint=Checkpoint.from_directory(str(view)) if view is not None else None)
        if view is not None and view != Path(ckpt_dir):
            shutil.rmtree(view, ignore_errors=True)

    def restored_checkpoint(self) -> Optional[Path]:
        ck = self._train.get_checkpoint()
        if ck is not None:
            return Path(ck.to_directory())
        # A worker killed outright (SIGKILL, lost node) can take reports the controller had not
        # registered yet with it; the checkpoints already persisted in the run's storage remain.
        last = latest_ray_checkpoint(self.storage) if self.storage else None
        return fetch_checkpoint(last) if last else None

    def sync(self) -> None:
        if self.run is not None and self.rank == 0:
            self.run.push()
