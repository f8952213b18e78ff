"""Connect to Ray: join the cluster at --address / RAY_ADDRESS, or a running local one, else start one."""
from __future__ import annotations

import logging

import ray


def quiet_ray_data() -> None:
    """Our jobs print their own progress lines; Ray Data's per-operator logs would bury them."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent. Joins --address, else RAY_ADDRESS, else a reachable `ray start` cluster; starts a
    private local Ray only when none is given or reachable ('local' forces one). Never "auto", which
    would join whatever Ray happens to run on the machine."""
    quiet_ray_data()
    if ray.is_initialized():
        return
    from .status import reachable, resolve_address

    addr, src = resolve_address(address)
    if addr and (src in ("--address", "RAY_ADDRESS") or reachable(addr)):
        ray.init(address=addr)
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
