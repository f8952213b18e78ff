"""What every Ray Tune study's trial reserves and how it trains: the keys shared by `token_lm.prompt_study`,
`token_lm.mmpt.study` and `vlm.sweep` (each of those sections inherits them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrialResources:
    """A trial trains in-process on what it reserves (num_workers 0: small models), or launches a Ray Train
    run of num_workers workers, like `lumo train` with these keys in its train section."""
    cpus_per_trial: float = 1.0
    """CPUs each trial reserves. In-process it trains on them; a trial launching Ray Train only drives its
    run (its workers reserve their own), so a fraction (e.g. 0.25) leaves the CPUs to the workers."""
    gpus_per_trial: float = 0.0
    """In-process trials: GPUs each trial reserves (a fraction shares one); the trial trains on the GPU
    Ray gave it (CPU where CUDA is absent). Ray Train trials ask for GPUs with use_gpu instead."""
    accelerator_type: str = ""
    """With GPUs: the Ray accelerator type each trial (in-process) or worker (Ray Train) must land on
    (e.g. 'A100', 'H100'); '' = any GPU."""
    num_workers: int = 0
    """0: each trial trains in-process. N >= 1: each trial launches a Ray Train run (TorchTrainer) of N
    workers with cpus_per_worker / use_gpu / strategy below, and rank 0's scores reach Tune (ASHA)."""
    cpus_per_worker: float = 1.0
    """Ray Train trials: CPUs reserved per worker."""
    use_gpu: bool = False
    """Ray Train trials: one GPU per worker."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Ray Train trials: ddp (every worker holds the whole model) or fsdp (FSDP2 shards it across the
    workers), as the train section's strategy."""
