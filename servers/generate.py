"""`lumo serve`: a token-LM or stage-4 run behind Ray Serve (HTTP).

Thin: lumo_ray/serving.py checks a request and generates; this file puts it behind two deployments.
The Gateway (the ingress, no model, many requests in flight) checks the bearer token, answers
GET /health itself, parses and bounds every body (a refusal never reaches a model replica), forwards
generation to the Generator replicas, maps a lost replica to 503 + Retry-After, and writes one
access-log line per request. Each Generator replica loads the run, batches concurrent requests
(@serve.batch) and generates. GET /health, GET /v1/model, POST /v1/generate, and OpenAI's routes
(lumo_ray/openai_api.py: GET /v1/models, POST /v1/chat/completions, /v1/completions,
/v1/images/generations, /v1/audio/speech), whose requests join the same batches. A streamed request
(stream: true) gets its text as the replica generates it: a batch is an async generator that yields
each request's new text after every decoding step.
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
from starlette.responses import JSONResponse, Response, StreamingResponse

from lumo_ray import openai_api as oa
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


def _refusal(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if getattr(e, "retry", False) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _openai_error(e: oa.OpenAIError, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry or e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _answer(out) -> tuple[int, dict]:
    """A respond_batch answer as (status, JSON body)."""
    if isinstance(out, RequestError):
        return out.status, out.body()
    if isinstance(out, Exception):
        return 500, RequestError(500, "server", str(out)).body()
    return 200, out


def _lost_replica_errors() -> tuple:
    """What a handle call raises when its replica died or none is there: the request may be sent again."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    return (rx.RayActorError, rx.ActorUnavailableError, sx.ReplicaUnavailableError, sx.DeploymentUnavailableError,
            sx.BackPressureError)


async def _drain(events, pending=None) -> None:
    try:
        if pending is not None:
            await pending
        async for _ in events:
            pass
    except (Exception, StopAsyncIteration):  # (ended, or failed: the caller that would have read it is gone)
        pass


@serve.deployment
class Generator:
    """One model replica: the run loaded once, on the device Ray gave the replica; a batch of concurrent
    requests generated together (rows keep their own seeds), or one by one with serve.exact so each answer is
    `lumo generate`'s bytes. Answers (status, JSON body) pairs; never sees a body the Gateway refused."""

    def __init__(self, run_dir: str, limits: dict):
        import torch

        from lumo_ray.generate import load_run, require_same_space
        from lumo_ray.serving import served_tasks
        from pipelines.ray_env import unit_device

        torch.set_num_threads(1)
        self.limits = build(ServeConfig, limits, "serve config")
        device, ids = unit_device()
        self.replica = {"device": str(device), "ray_gpu_ids": ids}  # in /v1/model: where this replica computes
        self.run = load_run(run_dir, device=str(device))
        require_same_space(self.run)
        self.tasks = served_tasks(self.run)  # a base-LM run (`lumo train lm`): t2t
        self.lock = threading.Lock()  # one generation at a time per replica: torch state is shared
        self.generate_batch.set_max_batch_size(self.limits.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.limits.batch_wait_s)

    async def served(self) -> oa.Served:
        """What the Gateway needs to check OpenAI requests (asked once)."""
        export = Path(self.run.dir) / "export"
        image = self.run.adapters.image if "t2i" in self.tasks else None
        return oa.Served(model=self.run.name.rstrip("/").rsplit("/", 1)[-1], tasks=list(self.tasks),
                         created=int(export.stat().st_mtime) if export.exists() else 0,
                         image_size=int(getattr(image, "image_size", 0) or 0),
                         fingerprint=f"lumo-{self.run.ts.hash[:12]}" if self.run.ts is not None else "lumo-base-lm")

    async def model(self) -> tuple[int, dict]:
        return 200, {**model_info(self.run, self.tasks, self.limits), "replica": self.replica}

    async def generate(self, req) -> tuple[int, dict]:
        """One request's whole answer."""
        answer = (500, RequestError(500, "server", "the batch ended without this request's answer").body())
        async for events in self.generate_batch(req):  # to its end, which comes right after "done"
            for ev in events:
                if ev[0] == "done":
                    answer = ev[1]
        return answer

    async def stream(self, req):
        """One request's events as they come: ("start",) once its prompt is built, ("text", row, delta)
        as a row grows (req.stream), ("done", (status, body)) last (or first, for a refused request)."""
        events_of, pending = self.generate_batch(req), None
        try:
            while True:
                pending = asyncio.ensure_future(events_of.__anext__())
                try:  # shielded: a caller gone mid-stream leaves the batch's own iteration whole
                    events = await asyncio.shield(pending)
                except StopAsyncIteration:
                    pending = None
                    return
                pending = None
                if events:
                    yield events
        finally:  # the caller went away: the batch's last events are still read (no future left unread)
            asyncio.ensure_future(_drain(events_of, pending))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, reqs: list):
        """A batch generated in a worker thread (together, or one by one with serve.exact); each time the
        thread has news every request gets the list of its new events (empty when none), and StopIteration
        after its "done": streamed and whole requests share the batch."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(k: int, event: tuple) -> None:  # from the worker thread
            loop.call_soon_threadsafe(queue.put_nowait, (k, event))

        async def work() -> None:
            try:
                for ks in ([[k] for k in range(len(reqs))] if self.limits.exact else [list(range(len(reqs)))]):
                    await loop.run_in_executor(None, self._generate, [reqs[k] for k in ks], ks, emit)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = asyncio.ensure_future(work())
        finished, over = [False] * len(reqs), False
        while not over:
            got = [await queue.get()]
            while not queue.empty():
                got.append(queue.get_nowait())
            events: list = [[] for _ in reqs]
            for item in got:
                if item is None:
                    over = True
                else:
                    events[item[0]].append(item[1])
            out, ended = [], False
            for k, evs in enumerate(events):
                out.append(StopIteration if finished[k] else evs)
                if not finished[k] and any(e[0] == "done" for e in evs):
                    finished[k] = ended = True
            yield out
            if ended and not over:  # end those callers' iterations now, not at the batch's next news
                yield [StopIteration if f else [] for f in finished]
        await worker
        if not all(finished):  # (every request is answered; should one not be, no caller waits forever)
            yield [StopIteration if f else [("done", (500, RequestError(500, "server", "no answer").body()))]
                   for f in finished]

    def _generate(self, reqs: list, ks: list, emit) -> None:
        """respond_batch in the worker thread, its news sent to the event loop by emit(k, event)."""
        def ready(j: int, err) -> None:
            emit(ks[j], ("done", _answer(err)) if err is not None else ("start",))

        with self.lock:
            try:
                out = respond_batch(self.run, reqs, self.limits, on_ready=ready,
                                    on_text=lambda j, row, delta: emit(ks[j], ("text", row, delta)))
            except Exception as e:  # a bug, not the clients' input: a 500 naming it
                out = [e] * len(reqs)
        for j, o in enumerate(out):
            if isinstance(o, RequestError):
                continue  # answered by on_ready, before the batch generated
            emit(ks[j], ("done", _answer(o if isinstance(o, dict) else RuntimeError(f"{type(o).__name__}: {o}"))))


class _EventStream(StreamingResponse):
    """Server-sent events. A client gone mid-stream reaches Serve's replica as a raised receive() (its
    request task cancelled) rather than an http.disconnect message: that is the disconnect too, so the
    stream ends quietly (access log 499) instead of leaving an unretrieved task exception in the log."""

    async def listen_for_disconnect(self, receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except Exception:
            return


class _Failed(RequestError):
    """A Generator call that brought no answer (timeout, lost replica, a bug); `retry`: send Retry-After."""

    def __init__(self, status: int, field: str, message: str, retry: bool = False):
        super().__init__(status, field, message)
        self.retry = retry


def _is_openai(path: str) -> bool:
    return path in oa.ROUTES or path == "/v1/models" or path.startswith("/v1/models/")


@serve.deployment(max_ongoing_requests=GATEWAY_SLOTS)
class Gateway:
    """The ingress: token, /health, body checks, forwarding, 503 on a lost replica, the access log."""

    def __init__(self, generator, limits: dict, token: str, access_log: str):
        self.generator = generator  # a DeploymentHandle to the Generator replicas
        self.limits = build(ServeConfig, limits, "serve config")
        self.token = token
        self.log = open_access_log(Path(access_log))
        self.lost = _lost_replica_errors()
        self.served: Optional[oa.Served] = None  # what the run serves, asked of a replica once
        self.waiting = 0
        self.replicas = (0.0, 0)  # (when counted, model replicas running)
        self.counting = asyncio.Lock()

    async def __call__(self, request: Request) -> Response:
        from ray.serve.context import _get_serve_request_context  # Serve's id: the X-Request-ID it answers with

        t0, when, status, streams = time.perf_counter(), time.time(), 500, False
        rid = _get_serve_request_context().request_id
        try:
            try:
                resp = await self._answer(request)
            except Exception as e:  # a bug here: still the JSON error format, never Serve's plain-text 500
                resp = _error(500, "server", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            status = resp.status_code
            if isinstance(resp, StreamingResponse):  # logged when its last event is sent
                resp.body_iterator = self._logged(resp.body_iterator, request, when, t0, rid)
                streams = True
            return resp
        except asyncio.CancelledError:  # the client went away (nginx's 499)
            status = 499
            raise
        finally:
            if not streams:
                self._log(request, when, status, time.perf_counter() - t0, rid)

    async def _logged(self, body, request: Request, when: float, t0: float, rid: str):
        status = 499  # unless every event was sent
        try:
            async for chunk in body:
                yield chunk
            status = 200
        finally:
            self._log(request, when, status, time.perf_counter() - t0, rid)
            try:
                await body.aclose()  # its own cleanup: the waiting count, the replica's stream
            except BaseException:  # (cancelled with the client: that cleanup has no await, it ran)
                pass

    def _log(self, request: Request, when: float, status: int, seconds: float, rid: str) -> None:
        client = request.client
        line = access_line(when, f"{client.host}:{client.port}" if client else "", request.method,
                           request.url.path, status, seconds, rid)
        try:
            self.log.write(line + "\n")
        except OSError:  # a full disk does not take the server down
            pass

    async def _answer(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if self.token and not bearer_ok(request.headers.get("authorization", ""), self.token):
            if _is_openai(path):
                return _openai_error(oa.OpenAIError(401, None, "Incorrect API key: send `Authorization: Bearer "
                                                               "<token>` (serve.token_file)", "invalid_api_key"))
            return _error(401, "authorization", "send `Authorization: Bearer <token>` (serve.token_file)")
        if path == "/health" and method == "GET":
            return await self._health()
        if _is_openai(path):
            return await self._openai(request, path, method)
        if path == "/v1/model" and method == "GET":
            try:
                status, out = await self._call(self.generator.model.remote())
            except _Failed as e:
                return _refusal(e)
            return JSONResponse(out, status_code=status)
        if path != "/v1/generate":
            return _error(404, "path", f"{path} is not an endpoint: GET /health, GET /v1/model, POST /v1/generate; "
                                       f"OpenAI's GET /v1/models, POST {', '.join(oa.ROUTES)}")
        if method != "POST":
            return _error(405, "method", f"{method} {path}: use POST")
        try:
            body = await self._body(request)
            served = await self._served()
            req = parse_request(body, served.tasks, self.limits)
            status, out = await self._generate(req)
        except RequestError as e:
            return _refusal(e)
        return JSONResponse(out, status_code=status)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise RequestError(413, "body", f"{declared} bytes, over the {self.limits.max_body_bytes}-byte limit")
        return await request.body()

    async def _served(self) -> oa.Served:
        if self.served is None:
            self.served = await self._call(self.generator.served.remote())
        return self.served

    def _take_slot(self) -> None:
        """One more generation request in flight, or a 503 (busy) while MAX_WAITING already are."""
        if self.waiting >= MAX_WAITING:
            raise _Failed(503, "server", f"{self.waiting} requests already wait for a replica; send it again later",
                          retry=True)
        self.waiting += 1

    async def _generate(self, req) -> tuple[int, dict]:
        self._take_slot()
        try:
            return await self._call(self.generator.generate.remote(req))
        finally:
            self.waiting -= 1

    async def _call(self, awaitable):
        """A Generator call's answer, bounded by serve.timeout_s; _Failed when none came: a lost replica is a
        503 with Retry-After."""
        try:
            return await asyncio.wait_for(awaitable, timeout=self.limits.timeout_s)
        except asyncio.TimeoutError:
            raise _Failed(504, "timeout", f"no answer within {self.limits.timeout_s} s (serve.timeout_s)") from None
        except self.lost as e:
            raise _Failed(503, "server", f"the model replica was lost ({type(e).__name__}); Serve is restarting it, "
                                         f"send the request again", retry=True) from None
        except StopAsyncIteration:
            raise
        except Exception as e:  # a bug in a replica: a 500 naming it, in the same JSON
            raise _Failed(500, "server", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") \
                from None

    # -- OpenAI's routes (lumo_ray/openai_api.py) -----------------------------------------------------

    async def _openai(self, request: Request, path: str, method: str) -> Response:
        fields: dict = {}
        try:
            expected = "GET" if path.startswith("/v1/models") else "POST"
            if method != expected:
                raise oa.OpenAIError(405, None, f"{method} {path}: use {expected}", "method_not_allowed")
            served = await self._served()
            if path == "/v1/models":
                return JSONResponse(oa.models_list(served))
            if path.startswith("/v1/models/"):
                if path[len("/v1/models/"):] != served.model:
                    raise oa.OpenAIError(404, "model", f"no model {path[len('/v1/models/'):]!r}: this server has "
                                                       f"{served.model!r}", "model_not_found")
                return JSONResponse(oa.model_card(served))
            req = oa.parse_openai(oa.ROUTES[path], await self._body(request), served, self.limits)
            fields = req.fields
            if req.stream:
                return await self._stream(req, served)
            status, out = await self._generate(req.gen)
            if status != 200:
                raise oa.from_request_error(status, out, fields)
            created = oa.now()
            if req.route in ("chat", "completion"):
                return JSONResponse(oa.text_response(req, out, oa.new_id(req.route), served, created))
            if req.route == "image":
                return JSONResponse(oa.images_response(out, created))
            return Response(oa.speech_bytes(out), media_type="audio/wav")
        except oa.OpenAIError as e:
            return _openai_error(e)
        except RequestError as e:
            return _openai_error(oa.from_request_error(e.status, e.body(), fields), getattr(e, "retry", False))

    async def _stream(self, req: oa.OpenAIRequest, served: oa.Served) -> Response:
        """Server-sent events of the replica's stream. Its first events come before the response starts,
        so a request the replica refuses (media it cannot decode) is still a 400 with its JSON."""
        self._take_slot()
        handed, first = False, None
        gen = self.generator.options(stream=True).stream.remote(req.gen)
        try:
            try:
                first = await self._call(gen.__anext__())
            except StopAsyncIteration:
                raise _Failed(500, "server", "the replica's stream ended before it began") from None
            refused = next((ev[1] for ev in first if ev[0] == "done" and ev[1][0] != 200), None)
            if refused is not None:
                raise oa.from_request_error(*refused, req.fields)
            sse = oa.TextStream(req, oa.new_id(req.route), served, oa.now())
            handed = True
            return _EventStream(self._events(req, sse, gen, first), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache"})
        finally:
            if not handed:
                self.waiting -= 1
                if first is None:  # no answer (timeout, lost replica): stop it (a refusal ends by itself)
                    gen.cancel()

    async def _events(self, req: oa.OpenAIRequest, sse: oa.TextStream, gen, events: list):
        """The SSE text of a stream; a failure after it began is an error event (its status was sent)."""
        ended = False
        try:
            yield sse.start()
            while True:
                for ev in events:
                    if ev[0] == "text":
                        yield sse.text(ev[1], ev[2])
                    elif ev[0] == "done":
                        status, out = ev[1]
                        ended = True
                        yield sse.done(out) if status == 200 else sse.error(oa.from_request_error(status, out,
                                                                                                    req.fields))
                        return
                try:
                    events = await self._call(gen.__anext__())
                except StopAsyncIteration:
                    raise _Failed(500, "server", "the replica's stream ended without an answer") from None
        except RequestError as e:  # no news within serve.timeout_s, a lost replica
            yield sse.error(oa.from_request_error(e.status, e.body(), req.fields))
        finally:
            self.waiting -= 1
            if not ended:
                gen.cancel()  # the client went away (or no news): the replica stops sending, its batch goes on

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
        f"{', bearer token required' if s.token_file else ''}): GET /health, GET /v1/model, POST /v1/generate, "
        f"OpenAI's /v1 (models, chat/completions, completions, images/generations, audio/speech); "
        f"access log {access_log_path(s, run_dir)}; Ctrl-C stops")
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    say("[serve] stopping")
    serve.shutdown()
    ray.shutdown()
    say("[serve] stopped")
