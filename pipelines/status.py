"""`lumo status`: what the reachable Ray cluster offers, and what a config would ask of it.

    from pipelines.status import run_status
    report = run_status(cfg, address="127.0.0.1:6379")   # prints, returns a dict

Never starts a cluster. The address is taken from --address, else RAY_ADDRESS, else the file that
`ray start --head` leaves in the Ray temp dir (same order as `ray.init()`); an address that does
not answer on TCP counts as "no cluster". With no cluster the report shows what local mode would
start on this machine (every core, no GPU unless one is visible) instead of starting a Ray just to
look. Only `cluster_offer` and `alive_nodes` import Ray; the rest is plain Python (tested without a cluster).
`require_fit` is every job's pre-launch check: a request the joined cluster cannot hold is refused.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from lumo_ray.errors import UserError
from lumo_ray.config.tune import TrialResources
from lumo_ray.resources import STUDIES, Resources, job_resources, study_resources, train_resources

GiB = 1024 ** 3
# Resource keys Ray adds on its own: shown as node facts, not as custom resources.
_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def _default_address_file() -> Path:
    # Mirrors ray._common.utils.get_ray_address_file(None): <system temp>/ray/ray_current_cluster.
    base = os.environ.get("RAY_TMPDIR") or ("/tmp" if os.name != "nt" else tempfile.gettempdir())
    return Path(base) / "ray" / "ray_current_cluster"


def resolve_address(address: Optional[str] = None) -> tuple[Optional[str], str]:
    """(address or None, where it came from). 'local' and '' mean: do not join anything."""
    if address:
        return (None, "--address local") if address == "local" else (address, "--address")
    env = os.environ.get("RAY_ADDRESS", "")
    if env:
        return (None, "RAY_ADDRESS=local") if env == "local" else (env, "RAY_ADDRESS")
    f = _default_address_file()
    if f.exists() and f.read_text().strip():
        return f.read_text().strip(), f"`ray start` address file {f}"
    return None, "nothing given (no --address, no RAY_ADDRESS, no `ray start` cluster)"


def reachable(address: str, timeout: float = 2.0) -> bool:
    """True when the GCS port (host:port) or the dashboard URL (http://host:port) accepts a TCP connection."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def cluster_offer(address: str) -> dict:
    """Connect as a driver (never start anything) and describe every alive node.

    An http:// address is a job-server (dashboard) URL: Ray Client / drivers need the GCS address
    instead, so it is refused with a hint rather than guessed."""
    if address.startswith(("http://", "https://")):
        raise ValueError(f"{address} is a job-server (dashboard) URL; `lumo status` needs the GCS address "
                         "host:6379 (or run it as a job: ray job submit --address ... -- lumo status)")
    import ray

    joined_here = not ray.is_initialized()
    if joined_here:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        avail = ray.available_resources()
        return {"address": address, "nodes": alive_nodes(),
                "available": {k: avail.get(k, 0.0) for k in ("CPU", "GPU")}}
    finally:
        if joined_here:
            ray.shutdown()


def alive_nodes() -> list[dict]:
    """Every alive node of the Ray this process is connected to (head first)."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = dict(n.get("Resources", {}))
        nodes.append({
            "node_id": n["NodeID"][:12], "ip": n.get("NodeManagerAddress", "?"),
            "head": "node:__internal_head__" in res,
            "cpus": res.get("CPU", 0.0), "gpus": res.get("GPU", 0.0),
            "memory_gib": res.get("memory", 0.0) / GiB,
            "object_store_gib": res.get("object_store_memory", 0.0) / GiB,
            "custom": {k: v for k, v in sorted(res.items()) if k not in _BUILTIN and not k.startswith("node:")},
        })
    return sorted(nodes, key=lambda x: (not x["head"], x["ip"], x["node_id"]))


def local_offer() -> dict:
    """What `ray.init()` on this machine would start with (no Ray started)."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        mem = 0.0
    gpus = len([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]) \
        if "CUDA_VISIBLE_DEVICES" in os.environ else len(list(Path("/dev").glob("nvidia[0-9]*")))
    # Ray gives the object store 30% of memory by default.
    return {"address": None, "nodes": [{"node_id": "local", "ip": "127.0.0.1", "head": True,
                                       "cpus": float(os.cpu_count() or 1), "gpus": float(gpus),
                                       "memory_gib": mem * 0.7, "object_store_gib": mem * 0.3, "custom": {}}],
            "available": None}


def _workers(node: Any, path: str) -> list[Resources]:
    """Ray Train worker groups anywhere in the config: every train section (one with `num_workers`)."""
    if not dataclasses.is_dataclass(node) or isinstance(node, TrialResources):  # a study: study_resources
        return []
    names = {f.name for f in dataclasses.fields(node)}
    found = [train_resources(node, path)] if "num_workers" in names else []
    for f in dataclasses.fields(node):
        found += _workers(getattr(node, f.name), f"{path}.{f.name}" if path else f.name)
    return found


def config_asks(cfg: Any, actors: Optional[int] = None) -> list[dict]:
    """Resource requests of a LumoConfig: one row per actor/worker group (count x per-unit CPUs/GPUs)."""
    groups = job_resources(cfg, "normalize") + job_resources(cfg, "tokenize", actors) + job_resources(cfg, "verify") \
        + job_resources(cfg, "embed") + job_resources(cfg, "generate") + job_resources(cfg, "serve") + _workers(cfg, "")
    for section in STUDIES:
        st = cfg
        for k in section.split("."):
            st = getattr(st, k)
        groups += study_resources(st, section)
    return [dataclasses.asdict(g) for g in groups]


def fit_problems(asks: list[dict], offer: dict) -> list[str]:
    """Why request groups cannot be scheduled: what the pre-launch check refuses (`misfit`), and, since
    `lumo status` plans a whole config, groups whose CPUs exceed the cluster's (Ray would run them a part
    at a time) and tokenize's loaders + actors, which run at once."""
    nodes = offer["nodes"]
    tot_cpu = sum(n["cpus"] for n in nodes)
    problems = []
    for a in asks:
        err = misfit(Resources(**a), nodes)
        if err is not None:
            problems.append(f"{err.what}: {err.why}")
        elif a["count"] * a["cpus"] > tot_cpu:
            problems.append(f"{a['what']}: {a['count']} x {a['cpus']:g} CPU > {tot_cpu:g} CPUs in the cluster")
    data = [a for a in asks if a["what"].startswith("data.tokenize")]
    need_cpu = sum(a["count"] * a["cpus"] for a in data)
    if need_cpu > tot_cpu and not any("data.tokenize" in p for p in problems):
        problems.append(f"data.tokenize: loaders + actors need {need_cpu:g} CPUs together, the cluster has {tot_cpu:g}")
    return problems


def misfit(r: Resources, nodes: list[dict]) -> Optional[UserError]:
    """Why the cluster can never hold group `r`, as a one-line error naming its config key, or None:
    more GPUs in all than the cluster has, one unit larger than every node (CPUs, GPUs, or both on one
    node), an accelerator type no node has. (Total CPUs are not refused: Ray runs a CPU pool or a study
    a part at a time as CPUs free up.)"""
    if r.count <= 0:
        return None
    tot_gpu = sum(n["gpus"] for n in nodes)
    big_cpu, big_gpu = max((n["cpus"] for n in nodes), default=0.0), max((n["gpus"] for n in nodes), default=0.0)
    more = "or run on a cluster with more (`lumo status` shows what it has)"
    if r.count * r.gpus > tot_gpu:
        return UserError(r.key(r.gpus_key), None, f"{r.count} x {r.gpus:g} GPU = {r.count * r.gpus:g} GPUs asked "
                         f"({r.what}), the cluster has {tot_gpu:g}",
                         f"lower it{' or ' + r.key(r.count_key) if r.count_key else ''}, {more}")
    if r.gpus > big_gpu:
        return UserError(r.key(r.gpus_key), None, f"one of the {r.what} asks {r.gpus:g} GPUs, the largest node has "
                         f"{big_gpu:g}", f"lower it, {more}")
    if r.cpus > big_cpu:
        return UserError(r.key(r.cpus_key), None, f"one of the {r.what} asks {r.cpus:g} CPUs, the largest node has "
                         f"{big_cpu:g}", f"lower it, {more}")
    if not any(n["cpus"] >= r.cpus and n["gpus"] >= r.gpus for n in nodes):
        most = max(n["cpus"] for n in nodes if n["gpus"] >= r.gpus)
        return UserError(r.key(r.cpus_key), None, f"one of the {r.what} asks {r.cpus:g} CPUs + {r.gpus:g} GPU, "
                         f"no node has both (its GPU nodes have {most:g} CPUs at most)", f"lower it, {more}")
    kinds = sorted({k.split(":", 1)[1] for n in nodes for k in n.get("custom", {})
                    if k.startswith("accelerator_type:")})
    if r.accelerator_type and r.accelerator_type not in kinds:
        return UserError(r.key("accelerator_type"), None, f"{r.what} ask for {r.accelerator_type!r} GPUs, no node "
                         f"has that type (here: {', '.join(kinds) or 'none'})", f"set '' for any GPU, {more}")
    return None


def require_fit(groups: list[Resources]) -> None:
    """Before a job starts its first actor, on the Ray this process joined: refuse (UserError: one line,
    `lumo` exits 2) the first group the cluster cannot hold (`misfit`). A request Ray could only wait on
    forever, or that would run on CPU unnoticed, fails here instead."""
    nodes = alive_nodes()
    for r in groups:
        err = misfit(r, nodes)
        if err is not None:
            raise err


def format_status(offer: dict, asks: list[dict], problems: list[str], source: str) -> str:
    lines = []
    if offer["address"]:
        lines.append(f"cluster at {offer['address']} (from {source}): {len(offer['nodes'])} alive node(s)")
    else:
        lines.append(f"no cluster reachable ({source}); local mode would start one on this machine with:")
    lines.append(f"  {'node':19s} {'ip':15s} {'CPU':>5s} {'GPU':>4s} {'mem GiB':>8s} {'objstore GiB':>12s}  custom")
    for n in offer["nodes"]:
        custom = ", ".join(f"{k}={v:g}" for k, v in n["custom"].items()) or "-"
        name = n["node_id"] + (" (head)" if n["head"] and offer["address"] else "")
        lines.append(f"  {name:19s} {n['ip']:15s} {n['cpus']:5g} {n['gpus']:4g} {n['memory_gib']:8.1f} "
                     f"{n['object_store_gib']:12.2f}  {custom}")
    tot = {k: sum(n[k] for n in offer["nodes"]) for k in ("cpus", "gpus", "memory_gib", "object_store_gib")}
    lines.append(f"  {'total':19s} {'':15s} {tot['cpus']:5g} {tot['gpus']:4g} {tot['memory_gib']:8.1f} "
                 f"{tot['object_store_gib']:12.2f}")
    if offer.get("available"):
        lines.append(f"  free now: {offer['available']['CPU']:g} CPU, {offer['available']['GPU']:g} GPU")
    lines.append("config asks for:")
    for a in asks:
        lines.append(f"  {a['what']:40s} {a['count']:3d} x ({a['cpus']:g} CPU, {a['gpus']:g} GPU)"
                     f"  = {a['count'] * a['cpus']:g} CPU, {a['count'] * a['gpus']:g} GPU")
    lines += [f"  DOES NOT FIT: {p}" for p in problems] or ["  fits: every request group can be scheduled"]
    return "\n".join(lines)


def run_status(cfg: Any, address: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Print and return {'offer', 'asks', 'problems', 'source'}; starts no Ray.

    Raises ConnectionError when an explicit --address / RAY_ADDRESS does not answer."""
    addr, source = resolve_address(address)
    if addr and not reachable(addr):
        if source in ("--address", "RAY_ADDRESS"):  # asked for explicitly: say so instead of guessing
            raise ConnectionError(f"no Ray cluster answers at {addr} (from {source})")
        source = f"stale {source}: {addr} does not answer"
        addr = None
    offer = cluster_offer(addr) if addr else local_offer()
    asks = config_asks(cfg)
    problems = fit_problems(asks, offer)
    log(format_status(offer, asks, problems, source))
    return {"offer": offer, "asks": asks, "problems": problems, "source": source}
