"""What each Ray job asks of the cluster, read from its config section in one place.

A job is one or more groups of Ray units (loader / model actors, Serve replicas, Train workers); each
group is a `Resources`. The launchers hand `ray_options()` to Ray, `lumo status` prints the groups and
the pre-launch check (pipelines/status.py) refuses a group the cluster cannot hold, naming its keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Resources:
    """One group of a job's Ray units and what each unit reserves."""
    what: str
    """The group as `lumo status` prints it, e.g. 'data.tokenize actors (codec encode)'."""
    section: str
    """The config section holding its keys, e.g. 'data.tokenize' (refusals name section.key)."""
    count: int
    """Units in the group (actors, replicas, workers)."""
    cpus: float
    """CPUs each unit reserves."""
    gpus: float = 0.0
    """GPUs each unit reserves (a fraction shares one GPU between units; 0 = CPU only)."""
    accelerator_type: str = ""
    """Ray accelerator type every unit must land on (e.g. 'A100', 'H100'); '' = any GPU."""
    count_key: str = ""
    """The key of `count` in the section ('' when it is fixed or comes from a flag)."""
    cpus_key: str = ""
    """The key of `cpus` in the section."""
    gpus_key: str = ""
    """The key of `gpus` in the section ('' for a CPU-only group)."""

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if name else self.section

    def ray_options(self) -> dict:
        """Ray's per-unit options (map_batches, ray_actor_options): num_cpus, num_gpus, accelerator_type."""
        opts: dict[str, Any] = {"num_cpus": self.cpus}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts


def _pool(section: str, c: Any, actors: Optional[int], stage: str) -> list[Resources]:
    """tokenize / embed: a CPU loader pool feeding a model actor pool (same key names in both sections)."""
    return [Resources(f"{section} loaders (CPU decode)", section, c.loaders, c.num_cpus_per_loader,
                      count_key="loaders", cpus_key="num_cpus_per_loader"),
            Resources(f"{section} actors ({stage})", section, actors or c.actors, c.num_cpus_per_actor,
                      c.num_gpus_per_actor, c.accelerator_type, "actors", "num_cpus_per_actor", "num_gpus_per_actor")]


def task_resources(job: str, c: Any) -> Resources:
    """normalize / verify: CPU-only Ray Data tasks (as many at once as the cluster holds), each reserving
    the section's num_cpus_per_task."""
    what = "probe tasks (media headers)" if job == "normalize" else "shard-check tasks"
    return Resources(f"data.{job} {what}", f"data.{job}", 1, c.num_cpus_per_task, cpus_key="num_cpus_per_task")


def train_resources(t: Any, section: str) -> Resources:
    """Ray Train workers of a train section: num_workers x (cpus_per_worker, one GPU each when use_gpu)."""
    return Resources(f"{section} workers", section, t.num_workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0,
                     getattr(t, "accelerator_type", ""), "num_workers", "cpus_per_worker", "use_gpu")


def study_resources(st: Any, section: str) -> list[Resources]:
    """One trial of a Tune study (a config.tune.TrialResources section): in-process, the trial's CPUs and
    GPUs; launching Ray Train, the trial's own CPUs and its run's workers. A study runs as many trials
    at a time as the cluster holds, so one trial is what must fit."""
    if st.num_workers <= 0:
        return [Resources(f"{section} trials", section, 1, st.cpus_per_trial, st.gpus_per_trial,
                          st.accelerator_type, "", "cpus_per_trial", "gpus_per_trial")]
    return [Resources(f"{section} trials", section, 1, st.cpus_per_trial, cpus_key="cpus_per_trial"),
            Resources(f"{section} trial workers", section, st.num_workers, st.cpus_per_worker,
                      1.0 if st.use_gpu else 0.0, st.accelerator_type, "num_workers", "cpus_per_worker", "use_gpu")]


STUDIES = ("token_lm.prompt_study", "token_lm.mmpt.study", "vlm.sweep")  # the Tune studies' sections


def job_resources(cfg: Any, job: str, count: Optional[int] = None) -> list[Resources]:
    """The groups of a job of a LumoConfig: 'normalize', 'verify', 'tokenize', 'embed', 'generate' (batch
    generation) or 'serve'.
    `count`: a command-line override of the model actors / replicas."""
    if job in ("normalize", "verify"):
        return [task_resources(job, getattr(cfg.data, job))]
    if job == "tokenize":
        return _pool("data.tokenize", cfg.data.tokenize, count, "codec encode")
    if job == "embed":
        return _pool("data.embed", cfg.data.embed, count, "CLIP embed")
    if job == "generate":
        g = cfg.generate
        return [Resources("generate actors (batch generation)", "generate", count or g.actors,
                          g.num_cpus_per_actor, g.num_gpus_per_actor, g.accelerator_type,
                          "actors", "num_cpus_per_actor", "num_gpus_per_actor")]
    if job == "serve":
        s = cfg.serve
        return [Resources("serve replicas", "serve", count or s.replicas, s.cpus_per_replica, s.gpus_per_replica,
                          s.accelerator_type, "replicas", "cpus_per_replica", "gpus_per_replica")]
    raise ValueError(f"unknown job {job!r}: normalize, verify, tokenize, embed, generate or serve "
                     "(training: train_resources)")
