"""Connect to Ray: join the cluster at --address / RAY_ADDRESS, or a running local one, else start one."""
from __future__ import annotations

import logging
import os

import ray


def quiet_ray_data() -> None:
    """Our jobs print their own progress lines; Ray Data's per-operator logs would bury them."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent. Never starts a second cluster when one is reachable."""
    quiet_ray_data()
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
