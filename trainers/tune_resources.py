"""What a Tune trial asks of the cluster, for every study (the VLM sweep, the token-LM prompt and stage-4
studies): how many trials fit at once (refused before launch when none does), what Tune reserves for
one, and the line that says how a trial trains."""
from __future__ import annotations

from typing import Any

from lumo_ray.errors import UserError
from lumo_ray.resources import study_resources


def trials_at_once(st: Any, section: str) -> int:
    """How many trials of study section `st` the joined cluster holds at once, each with its workers.
    Before any trial starts, the pre-launch check (pipelines.status.require_fit: one line, exit 2)
    refuses a trial the cluster cannot hold, and one whose own CPUs and its workers' together exceed
    the cluster's (its Ray Train run would wait forever)."""
    import ray

    from pipelines.status import require_fit

    groups = study_resources(st, section)
    require_fit(groups)
    have = ray.cluster_resources()
    cpus, gpus = sum(g.count * g.cpus for g in groups), sum(g.count * g.gpus for g in groups)
    n = int(have.get("CPU", 0.0) / cpus + 1e-9) if cpus else 10 ** 6
    if gpus:
        n = min(n, int(have.get("GPU", 0.0) / gpus + 1e-9))
    if n < 1:
        raise UserError(f"{section}.num_workers", None, f"one trial takes {cpus:g} CPUs at once (cpus_per_trial + "
                        f"num_workers x cpus_per_worker), the cluster has {have.get('CPU', 0.0):g}",
                        "lower them, or run on a cluster with more (`lumo status` shows what it has)")
    return n


def trial_resources(st: Any) -> dict:
    """What Tune reserves for each trial: its CPUs, and in-process its GPUs (a Ray Train trial's workers
    reserve theirs when its run starts)."""
    if st.num_workers:
        return {"cpu": st.cpus_per_trial}
    res = {"cpu": st.cpus_per_trial, "gpu": st.gpus_per_trial}
    if st.gpus_per_trial and st.accelerator_type:
        res[f"accelerator_type:{st.accelerator_type}"] = 0.001  # Ray's convention for a type constraint
    return res


def trial_kind(st: Any) -> str:
    """How a trial trains, for the study's first line."""
    if st.num_workers:
        return (f"each a {st.num_workers}-worker Ray Train run ({st.strategy}, "
                + ("1 GPU" if st.use_gpu else f"{st.cpus_per_worker:g} CPU") + " per worker)")
    gpus = f", {st.gpus_per_trial:g} GPU" if st.gpus_per_trial else ""
    return f"in-process ({st.cpus_per_trial:g} CPU{gpus})"
