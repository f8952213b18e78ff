"""Connect to Ray: join the cluster at --address / RAY_ADDRESS, or a running local one, else start one."""
from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent. Never starts a second cluster when one is reachable."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(log_to_driver=True, include_dashboard=False) if not address else {}
    if address:
        ray.init(address=address)
        return
    try:  # join a local cluster started with `ray start --head`
        ray.init(address="auto")
        return
    except (ConnectionError, RuntimeError, ValueError):
        pass
    ray.init(num_cpus=num_cpus, **kwargs)
