"""`lumo status`: what the reachable Ray cluster offers, and what a config would ask of it.

    from pipelines.status import run_status
    report = run_status(cfg, address="127.0.0.1:6379")   # prints, returns a dict

Never starts a cluster. The address is taken from --address, else RAY_ADDRESS, else the file that
`ray start --head` leaves in the Ray temp dir (same order as `ray.init()`); an address that does
not answer on TCP counts as "no cluster". With no cluster the report shows what local mode would
start on this machine (every core, no GPU unless one is visible) instead of starting a Ray just to
look. Only `cluster_offer` imports Ray; the rest is plain Python (tested without a cluster).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

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
        avail = ray.available_resources()
        return {"address": address, "nodes": sorted(nodes, key=lambda x: (not x["head"], x["ip"], x["node_id"])),
                "available": {k: avail.get(k, 0.0) for k in ("CPU", "GPU")}}
    finally:
        if joined_here:
            ray.shutdown()


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


def _workers(node: Any, path: str) -> list[dict]:
    """Training/tuning worker requests anywhere in the config: any section with `num_workers`."""
    if not dataclasses.is_dataclass(node):
        return []
    found = []
    names = {f.name for f in dataclasses.fields(node)}
    if "num_workers" in names and isinstance(getattr(node, "num_workers"), int):
        g = lambda *ks, d=0.0: next((getattr(node, k) for k in ks if k in names and getattr(node, k) is not None), d)  # noqa: E731
        gpus = float(g("num_gpus_per_worker", "gpus_per_worker", d=0.0))
        if not gpus and bool(g("use_gpu", d=False)):
            gpus = 1.0
        found.append({"what": f"{path or 'config'} workers", "count": int(node.num_workers),
                      "cpus": float(g("num_cpus_per_worker", "cpus_per_worker", d=1.0)), "gpus": gpus})
    for f in dataclasses.fields(node):
        found += _workers(getattr(node, f.name), f"{path}.{f.name}" if path else f.name)
    return found


def config_asks(cfg: Any, actors: Optional[int] = None) -> list[dict]:
    """Resource requests of a LumoConfig: one row per actor/worker group (count x per-unit CPUs/GPUs)."""
    t = cfg.data.tokenize
    asks = [{"what": "data.tokenize loaders (CPU decode)", "count": t.loaders, "cpus": t.num_cpus_per_loader, "gpus": 0.0},
            {"what": "data.tokenize actors (codec encode)", "count": actors or t.actors,
             "cpus": t.num_cpus_per_actor, "gpus": t.num_gpus_per_actor}]
    return asks + _workers(cfg, "")


def fit_problems(asks: list[dict], offer: dict) -> list[str]:
    """Why a request group cannot be scheduled: per-unit bundle larger than every node, or totals too big."""
    nodes = offer["nodes"]
    problems = []
    tot_cpu = sum(n["cpus"] for n in nodes)
    tot_gpu = sum(n["gpus"] for n in nodes)
    for a in asks:
        if a["count"] <= 0:
            continue
        if not any(n["cpus"] >= a["cpus"] and n["gpus"] >= a["gpus"] for n in nodes):
            problems.append(f"{a['what']}: one unit needs {a['cpus']:g} CPU + {a['gpus']:g} GPU, no node has that")
        elif a["count"] * a["gpus"] > tot_gpu:
            problems.append(f"{a['what']}: {a['count']} x {a['gpus']:g} GPU > {tot_gpu:g} GPUs in the cluster")
        elif a["count"] * a["cpus"] > tot_cpu:
            problems.append(f"{a['what']}: {a['count']} x {a['cpus']:g} CPU > {tot_cpu:g} CPUs in the cluster")
    # Data stages run together: loaders + tokenizer actors share the cluster at once.
    data = [a for a in asks if a["what"].startswith("data.tokenize")]
    need_cpu = sum(a["count"] * a["cpus"] for a in data)
    if need_cpu > tot_cpu and not any("data.tokenize" in p for p in problems):
        problems.append(f"data.tokenize: loaders + actors need {need_cpu:g} CPUs together, the cluster has {tot_cpu:g}")
    return problems


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
