"""`lumo serve`: a token-LM or stage-4 run behind Ray Serve (HTTP).

Thin: lumo_ray/serving.py checks a request and generates; this file routes HTTP to it, batches
concurrent requests per replica (@serve.batch), bounds each generation by a timeout, and maps a
refused request to its 4xx JSON. GET /health, GET /v1/model, POST /v1/generate.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
from pathlib import Path
from typing import Optional

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from lumo_ray.config import LumoConfig, ServeConfig, build, to_dict
from lumo_ray.serving import RequestError, model_info, parse_request, respond_batch


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse(RequestError(status, field, message).body(), status_code=status)


@serve.deployment
class Generator:
    """One replica: the run loaded once, on the device Ray gave the replica; a batch of concurrent requests
    generated together (rows keep their own seeds), or one by one with serve.exact so each answer is
    `lumo generate`'s bytes."""

    def __init__(self, run_dir: str, limits: dict, token: str):
        import torch

        from lumo_ray.eval.gates import available_tasks
        from lumo_ray.generate import load_run, require_same_space
        from pipelines.ray_env import unit_device

        torch.set_num_threads(1)
        self.limits = build(ServeConfig, limits, "serve config")
        device, ids = unit_device()
        self.replica = {"device": str(device), "ray_gpu_ids": ids}  # in /v1/model: where this replica computes
        self.run = load_run(run_dir, device=str(device))
        require_same_space(self.run)
        self.tasks = available_tasks(self.run)
        self.token = token
        self.lock = threading.Lock()  # one generation at a time per replica: torch state is shared
        self.generate_batch.set_max_batch_size(self.limits.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.limits.batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, reqs: list) -> list:
        loop = asyncio.get_running_loop()
        if self.limits.exact:
            return [(await loop.run_in_executor(None, self._generate, [r]))[0] for r in reqs]
        return await loop.run_in_executor(None, self._generate, reqs)

    def _generate(self, reqs: list) -> list:
        with self.lock:
            try:
                out = respond_batch(self.run, reqs)
            except Exception as e:  # a bug, not the clients' input: a 500 naming it
                out = [e] * len(reqs)
        return [o if isinstance(o, (dict, RequestError)) else RuntimeError(f"{type(o).__name__}: {o}") for o in out]

    async def __call__(self, request: Request) -> JSONResponse:
        if self.token:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
                return _error(401, "authorization", "send `Authorization: Bearer <token>` (serve.token_file)")
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/health" and method == "GET":
            return JSONResponse({"status": "ok"})
        if path == "/v1/model" and method == "GET":
            return JSONResponse({**model_info(self.run, self.tasks, self.limits), "replica": self.replica})
        if path != "/v1/generate":
            return _error(404, "path", f"{path} is not an endpoint: GET /health, GET /v1/model, POST /v1/generate")
        if method != "POST":
            return _error(405, "method", f"{method} {path}: use POST")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            return _error(413, "body", f"{declared} bytes, over the {self.limits.max_body_bytes}-byte limit")
        body = await request.body()
        try:
            req = parse_request(body, self.tasks, self.limits)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        try:
            out = await asyncio.wait_for(self.generate_batch(req), timeout=self.limits.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, "timeout", f"generation took over {self.limits.timeout_s} s (serve.timeout_s)")
        if isinstance(out, RequestError):
            return JSONResponse(out.body(), status_code=out.status)
        if isinstance(out, Exception):
            return _error(500, "server", str(out))
        return JSONResponse(out)


def build_app(args: dict):
    """The application for a run: `lumo serve` binds it, and so does a KubeRay RayService
    (serveConfigV2 `import_path: servers.generate:build_app` with `args: {run, config, set}`).
    args: run (directory or URI, required), config (a YAML file; default the tiny preset), set (a list
    of KEY=VALUE); the replicas, their CPUs / GPUs and the limits come from the config's serve section.
    (No pre-launch check here: a KubeRay autoscaler may still be adding the GPU nodes.)"""
    from lumo_ray.config import load_config

    unknown = set(args) - {"run", "config", "set"}
    if unknown or "run" not in args:
        raise ValueError(f"serve application args: need 'run' (and optional 'config', 'set'), got {sorted(args)}")
    return bind(load_config(LumoConfig, args.get("config"), list(args.get("set") or [])), args["run"])


def bind(cfg: LumoConfig, run_dir: str):
    """The Generator deployment over a run, with the replicas and their resources (lumo_ray.resources), the
    limits and the bearer token of the config."""
    from lumo_ray.resources import job_resources
    from lumo_ray.storage import resolve

    s = cfg.serve
    (replicas,) = job_resources(cfg, "serve")
    token = Path(s.token_file).read_text().strip() if s.token_file else ""
    # Serve's default of 5 requests in flight per replica would cap a batch at 5; twice the batch size
    # lets the next batch gather while one generates.
    return Generator.options(num_replicas=replicas.count, max_ongoing_requests=2 * s.max_batch_size,
                             ray_actor_options=replicas.ray_options()).bind(resolve(run_dir), to_dict(s), token)


def run_server(cfg: LumoConfig, run_dir: str, address: Optional[str] = None, log=print,
               stop: Optional[threading.Event] = None) -> None:
    """Start Ray (or join a cluster), deploy the run on serve.replicas replicas at http://host:port,
    and serve until SIGINT / SIGTERM (or `stop` is set); then shut the application down."""
    import ray

    from lumo_ray.resources import job_resources
    from lumo_ray.storage import resolve
    from pipelines.ray_env import init_ray
    from pipelines.status import require_fit

    s = cfg.serve
    say = (lambda m: print(m, flush=True)) if log is print else log  # a pipe (ray job logs) sees it at once
    init_ray(address)
    require_fit(job_resources(cfg, "serve"))  # before Serve starts its controller and proxies
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines: its logs, not the console
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config={"log_level": "WARNING"})
    serve.run(bind(cfg, run_dir), name="lumo", route_prefix="/", logging_config={"log_level": "WARNING"})
    say(f"[serve] {resolve(run_dir)} on http://{s.host}:{s.port} ({s.replicas} replica(s)"
        f"{', bearer token required' if s.token_file else ''}): GET /health, GET /v1/model, POST /v1/generate; Ctrl-C stops")
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    say("[serve] stopping")
    serve.shutdown()
    ray.shutdown()
    say("[serve] stopped")
