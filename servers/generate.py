"""`lumo serve`: a token-LM or stage-4 run behind Ray Serve (HTTP).

Thin: lumo_ray/serving.py checks a request and generates; this file puts it behind two deployments.
The Gateway (the ingress, no model, many requests in flight) checks the bearer token, answers
GET /health itself, parses and bounds every body (a refusal never reaches a model replica), forwards
generation to the Generator replicas, maps a lost replica to 503 + Retry-After, and writes one
access-log line per request. Each Generator replica loads the run, batches concurrent requests
(@serve.batch) and generates. GET /health, GET /v1/model, POST /v1/generate.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from lumo_ray.config import LumoConfig, ServeConfig, build, to_dict
from lumo_ray.serve_guards import access_line, access_log_path, bearer_ok, open_access_log, read_token
from lumo_ray.serving import RequestError, model_info, parse_request, respond_batch

RETRY_AFTER_S = 5
"""Retry-After of a 503 (a lost or restarting replica): about what Serve takes to start a replica again."""
GATEWAY_SLOTS = 1024
"""Requests the Gateway holds at once (Serve's max_ongoing_requests); generation takes at most
MAX_WAITING of them, so /health and refusals always find a free one."""
MAX_WAITING = 512
"""Generation requests waiting for or on a replica; one more is a 503 (busy) with Retry-After."""
HEALTH_TTL_S = 1.0
"""How long /health reuses Serve's count of running model replicas."""


def _error(status: int, field: str, message: str, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return JSONResponse(RequestError(status, field, message).body(), status_code=status, headers=headers)


def _lost_replica_errors() -> tuple:
    """What a handle call raises when its replica died or none is there: the request may be sent again."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    return (rx.RayActorError, rx.ActorUnavailableError, sx.ReplicaUnavailableError, sx.DeploymentUnavailableError,
            sx.BackPressureError)


@serve.deployment
class Generator:
    """One model replica: the run loaded once, on the device Ray gave the replica; a batch of concurrent
    requests generated together (rows keep their own seeds), or one by one with serve.exact so each answer is
    `lumo generate`'s bytes. Answers (status, JSON body) pairs; never sees a body the Gateway refused."""

    def __init__(self, run_dir: str, limits: dict):
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
        self.lock = threading.Lock()  # one generation at a time per replica: torch state is shared
        self.generate_batch.set_max_batch_size(self.limits.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.limits.batch_wait_s)

    async def tasks_served(self) -> list:
        return self.tasks

    async def model(self) -> tuple[int, dict]:
        return 200, {**model_info(self.run, self.tasks, self.limits), "replica": self.replica}

    async def generate(self, req) -> tuple[int, dict]:
        out = await self.generate_batch(req)
        if isinstance(out, RequestError):
            return out.status, out.body()
        if isinstance(out, Exception):
            return 500, RequestError(500, "server", str(out)).body()
        return 200, out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, reqs: list) -> list:
        loop = asyncio.get_running_loop()
        if self.limits.exact:
            return [(await loop.run_in_executor(None, self._generate, [r]))[0] for r in reqs]
        return await loop.run_in_executor(None, self._generate, reqs)

    def _generate(self, reqs: list) -> list:
        with self.lock:
            try:
                out = respond_batch(self.run, reqs, self.limits)
            except Exception as e:  # a bug, not the clients' input: a 500 naming it
                out = [e] * len(reqs)
        return [o if isinstance(o, (dict, RequestError)) else RuntimeError(f"{type(o).__name__}: {o}") for o in out]


@serve.deployment(max_ongoing_requests=GATEWAY_SLOTS)
class Gateway:
    """The ingress: token, /health, body checks, forwarding, 503 on a lost replica, the access log."""

    def __init__(self, generator, limits: dict, token: str, access_log: str):
        self.generator = generator  # a DeploymentHandle to the Generator replicas
        self.limits = build(ServeConfig, limits, "serve config")
        self.token = token
        self.log = open_access_log(Path(access_log))
        self.lost = _lost_replica_errors()
        self.tasks: Optional[list] = None  # what the run serves, asked of a replica once
        self.waiting = 0
        self.replicas = (0.0, 0)  # (when counted, model replicas running)
        self.counting = asyncio.Lock()

    async def __call__(self, request: Request) -> JSONResponse:
        t0, when, status = time.perf_counter(), time.time(), 500
        try:
            try:
                resp = await self._answer(request)
            except Exception as e:  # a bug here: still the JSON error format, never Serve's plain-text 500
                resp = _error(500, "server", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            status = resp.status_code
            return resp
        except asyncio.CancelledError:  # the client went away (nginx's 499)
            status = 499
            raise
        finally:
            self._log(request, when, status, time.perf_counter() - t0)

    def _log(self, request: Request, when: float, status: int, seconds: float) -> None:
        from ray.serve.context import _get_serve_request_context  # Serve's id: the X-Request-ID it answers with

        client = request.client
        line = access_line(when, f"{client.host}:{client.port}" if client else "", request.method,
                           request.url.path, status, seconds, _get_serve_request_context().request_id)
        try:
            self.log.write(line + "\n")
        except OSError:  # a full disk does not take the server down
            pass

    async def _answer(self, request: Request) -> JSONResponse:
        if self.token and not bearer_ok(request.headers.get("authorization", ""), self.token):
            return _error(401, "authorization", "send `Authorization: Bearer <token>` (serve.token_file)")
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/health" and method == "GET":
            return await self._health()
        if path == "/v1/model" and method == "GET":
            return await self._call(self.generator.model.remote())
        if path != "/v1/generate":
            return _error(404, "path", f"{path} is not an endpoint: GET /health, GET /v1/model, POST /v1/generate")
        if method != "POST":
            return _error(405, "method", f"{method} {path}: use POST")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            return _error(413, "body", f"{declared} bytes, over the {self.limits.max_body_bytes}-byte limit")
        body = await request.body()
        if self.tasks is None:
            got = await self._call(self.generator.tasks_served.remote(), raw=True)
            if isinstance(got, JSONResponse):
                return got
            self.tasks = got
        try:
            req = parse_request(body, self.tasks, self.limits)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        if self.waiting >= MAX_WAITING:
            return _error(503, "server", f"{self.waiting} requests already wait for a replica; send it again later",
                          retry=True)
        self.waiting += 1
        try:
            return await self._call(self.generator.generate.remote(req))
        finally:
            self.waiting -= 1

    async def _call(self, response, raw: bool = False):
        """A Generator call's answer, bounded by serve.timeout_s: a lost replica is a 503 with Retry-After."""
        try:
            out = await asyncio.wait_for(response, timeout=self.limits.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, "timeout", f"no answer within {self.limits.timeout_s} s (serve.timeout_s)")
        except self.lost as e:
            return _error(503, "server", f"the model replica was lost ({type(e).__name__}); Serve is restarting it, "
                                         f"send the request again", retry=True)
        except Exception as e:  # a bug in a replica: a 500 naming it, in the same JSON
            return _error(500, "server", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        if raw:
            return out
        status, body = out
        return JSONResponse(body, status_code=status)

    async def _health(self) -> JSONResponse:
        """200 while a model replica is running (Serve's count, at most HEALTH_TTL_S old); 503 with
        Retry-After while none is (starting, or restarting a lost one). Never waits for a replica."""
        if time.monotonic() - self.replicas[0] > HEALTH_TTL_S:
            async with self.counting:
                if time.monotonic() - self.replicas[0] > HEALTH_TTL_S:
                    try:
                        counted = await asyncio.get_running_loop().run_in_executor(None, _count)
                    except Exception as e:  # the controller did not answer: say so, do not guess
                        return _error(503, "server", f"cannot count the model replicas ({type(e).__name__})",
                                      retry=True)
                    self.replicas = (time.monotonic(), counted)
        if self.replicas[1]:
            return JSONResponse({"status": "ok"})
        return _error(503, "server", "no model replica is running: Serve is starting one", retry=True)


def _count() -> int:
    """Running replicas of this application's Generator, from Serve's controller."""
    app = serve.get_replica_context().app_name
    return int(serve.status().applications[app].deployments["Generator"].replica_states.get("RUNNING", 0))


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


def bind(cfg: LumoConfig, run_dir: str, gateway_node: str = ""):
    """The Gateway over the Generator deployment of a run, with the replicas and their resources
    (lumo_ray.resources), the limits, the bearer token and the access log of the config. gateway_node:
    the node IP the Gateway (and so its access log) must be on ('' = anywhere)."""
    from lumo_ray.resources import job_resources
    from lumo_ray.storage import resolve

    s = cfg.serve
    (replicas,) = job_resources(cfg, "serve")
    token = read_token(s.token_file) if s.token_file else ""  # empty or unreadable: refused, never served open
    # Serve's default of 5 requests in flight per replica would cap a batch at 5; twice the batch size
    # lets the next batch gather while one generates.
    generator = Generator.options(num_replicas=replicas.count, max_ongoing_requests=2 * s.max_batch_size,
                                  ray_actor_options=replicas.ray_options()).bind(resolve(run_dir), to_dict(s))
    where = {"resources": {f"node:{gateway_node}": 0.001}} if gateway_node else {}
    return Gateway.options(ray_actor_options={"num_cpus": 0, **where}).bind(
        generator, to_dict(s), token, str(access_log_path(s, run_dir)))


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
    here = ray.get_runtime_context().get_node_id()  # the access log is written on this machine
    node = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == here)
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config={"log_level": "WARNING"})
    serve.run(bind(cfg, run_dir, gateway_node=node), name="lumo", route_prefix="/",
              logging_config={"log_level": "WARNING"})
    say(f"[serve] {resolve(run_dir)} on http://{s.host}:{s.port} ({s.replicas} replica(s)"
        f"{', bearer token required' if s.token_file else ''}): GET /health, GET /v1/model, POST /v1/generate; "
        f"access log {access_log_path(s, run_dir)}; Ctrl-C stops")
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    say("[serve] stopping")
    serve.shutdown()
    ray.shutdown()
    say("[serve] stopped")
