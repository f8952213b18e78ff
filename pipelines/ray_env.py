"""Connect to Ray: join the cluster at --address / RAY_ADDRESS, or a running local one, else start one."""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading

import ray


def quiet_ray_data() -> None:
    """Our jobs print their own progress lines; Ray Data's per-operator logs would bury them."""
    import ray.data  # its import configures the 'ray.data' logger (level DEBUG): set ours after it

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled" (we did)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


# Worker-side switches of Ray Train, inherited by the processes of a local Ray this driver starts:
# Train's print patch re-logs every print of a worker through a handler that also prints it (every
# rank-0 line came out twice), and its preemption watcher logs a core_worker error at each start.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def train_logging():
    """Ray Train's own console lines ("Reporting training result", "Checkpoint successfully created",
    worker-group start) at WARNING and above only: our trainers print their progress."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="WARNING")


def quiet_train_worker() -> None:
    """Inside a Ray Train worker: Train logs "Reporting training result ..." at INFO on every report
    through a logger named after its file, which Train's own log_level filter (train_logging) misses."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_actor_exit() -> None:
    """In a Ray worker process (a Tune trial, a Train worker): Ray stops a finished actor with SIGTERM,
    and its handler raises SystemExit wherever the process is, at times inside a weakref callback,
    which Python then prints as "Exception ignored in ... SystemExit: 1" with a traceback (seen once
    in a demo's prompt study). An exit raised there is dropped; any other unraisable exception is
    reported as before."""
    import sys

    def hook(u) -> None:
        if u.exc_type not in (SystemExit, KeyboardInterrupt):
            sys.__unraisablehook__(u)

    sys.unraisablehook = hook


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent. Joins --address, else RAY_ADDRESS, else a reachable `ray start` cluster; starts a
    private local Ray only when none is given or reachable ('local' forces one). Never "auto", which
    would join whatever Ray happens to run on the machine. Says so before it waits on Ray (a local
    start takes 10-20 s), and keeps what Ray prints here plain (runtime.watch_console: no colour codes off a
    terminal; native_lines_off_console)."""
    quiet_ray_data()
    if ray.is_initialized():
        return
    from lumo_ray.runtime import heartbeat, watch_console

    from .status import reachable, resolve_address

    addr, src = resolve_address(address)
    watch_console()  # before Ray prints: the workers' "(pid=..)" prefixes lose their colour off a terminal
    if addr and (src in ("--address", "RAY_ADDRESS") or reachable(addr)):
        print(f"[ray] joining the Ray cluster at {addr} ({src}) ...", flush=True)
        with heartbeat(f"joining Ray at {addr}"):
            ray.init(address=addr)
        native_lines_off_console()
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    # Ray's default (token auth on) announced as a WARNING at every start; the mode stays as Ray sets it
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    print("[ray] starting a local Ray ...", flush=True)
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls: without it the
    # cleaner logs "Failed to query Ray Train Controller actor state" every few seconds, forever.
    # Ray's own INFO lines ("Started a local Ray instance ...") stay in its session logs; one line here
    with heartbeat("starting a local Ray"):
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=True,
                       logging_level=logging.WARNING)
    native_lines_off_console()
    url = f"http://{ctx.dashboard_url}" if ctx.dashboard_url else "off"
    logs = os.path.join(ctx.address_info["session_dir"], "logs")
    print(f"[ray] started a local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs, dashboard {url}; "
          f"Ray's own logs: {logs})", flush=True)


# -- what Ray prints on this driver's console -------------------------------------------------------

# A line of Ray's C++ core (core worker, raylet): "[2026-12-07 09:21:39,739 E 8337 8337] core_worker.cc:2465: ...".
NATIVE_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] [\w.-]+\.(cc|h):\d+: ")
_NATIVE_BYTES = re.compile(NATIVE_LINE.pattern.encode())


def native_lines_off_console() -> None:
    """Ray's C++ log lines stay in Ray's session logs (the driver's python-core-driver-*.log, each
    worker's worker-*.err: Ray writes them there in any case) and off this console. The one seen on
    every run: Ray Data passes each actor pool its map function as an object reference, and its actors
    restart on failure (max_restarts=-1), so the core worker logs "has constructor arguments in the
    object store and max_restarts > 0" once per process that starts a pool (ray-project/ray#57733, open;
    the reference is held by the driver for the pool's life, so restarts do work: turning them off
    to hide the line would give up the pools' fault tolerance)."""
    _native_off_worker_lines()
    _native_off_driver_stderr()


def _native_off_worker_lines() -> None:
    """The workers' stderr lines Ray prints here: its printing handler, without the C++ lines. Ray has
    no public hook for this; should its dispatcher change, the lines simply show again."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - another Ray
        return
    with dispatcher._lock:
        handlers = []
        for name, handle in dispatcher.handlers:
            if name == "ray_print_logs" and not getattr(handle, "lumo_plain", False):
                handle = _without_native(handle)
            handlers.append((name, handle))
        dispatcher.handlers = handlers


def _without_native(handle):
    def printed(data: dict) -> None:
        lines = [s for s in data.get("lines", []) if not NATIVE_LINE.match(s)]
        if lines:
            handle({**data, "lines": lines})
    printed.lumo_plain = True
    return printed


_stderr_pump: threading.Thread | None = None


def _native_off_driver_stderr() -> None:
    """This process's own C++ lines go straight to file descriptor 2: it becomes a pipe that a thread
    copies to the real stderr, all but those lines; at exit the real stderr is back and the copy done."""
    global _stderr_pump
    if _stderr_pump is not None and _stderr_pump.is_alive():
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        return
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        held = b""
        with os.fdopen(r, "rb", buffering=0) as src:
            while True:
                chunk = src.read(65536)
                if not chunk:
                    break
                *lines, held = (held + chunk).split(b"\n")
                out = b"".join(s + b"\n" for s in lines if not _NATIVE_BYTES.match(s))
                if held and not held.startswith(b"["):  # a partial line that is no C++ line: on now
                    out, held = out + held, b""
                _write_all(real, out)
        _write_all(real, held)

    _stderr_pump = thread = threading.Thread(target=pump, name="lumo-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last write end here closes: the pump copies what is left and ends
        thread.join(timeout=5)

    atexit.register(restore)


def _write_all(fd: int, data: bytes) -> None:
    """All of data to fd; a closed reader (`lumo ... 2>&1 | head`) drops it, and the pump keeps draining."""
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data):]


def unit_device():
    """Inside a Ray actor, Serve replica or Train worker: (the torch device its compute runs on, the GPU ids
    Ray gave it). The device follows Ray's assignment (lumo_ray.runtime.assigned_device), so a unit that
    asked for no GPU stays on CPU, and a fake GPU (no CUDA here) computes on CPU too."""
    from lumo_ray.runtime import assigned_device

    ids = [str(i) for i in ray.get_gpu_ids()]
    return assigned_device(ids), ids


def placement(device, gpu_ids: list) -> str:
    """'cpu (Ray GPU ids 0)' for a job's log: where a unit computed and what Ray gave it."""
    return f"{device} (Ray GPU ids {','.join(gpu_ids) or 'none'})"


def quiet_tune() -> None:
    """Tune's console: our line per finished trial (trial_lines), not its experiment box, result tables
    and INFO lines (the new AIR output prints its box even at verbose=0; the legacy reporter does not)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def trial_lines(log, metric: str, total: int):
    """A Ray Tune callback that logs one line per finished (or failed) trial: its metric, reports, seconds."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self, log, metric: str, total: int):
            self.log, self.metric, self.total, self.done = log, metric, total, 0

        # Tune pickles its callbacks into the study's state (tuner.pkl): the log function may not
        # pickle (the demo's print, once Ray Train has patched builtins.print), so it stays out of
        # the state (the class closes over nothing), and a restored study prints with print
        def __getstate__(self):
            return {k: v for k, v in self.__dict__.items() if k != "log"}

        def __setstate__(self, state):
            self.__dict__.update(state, log=print)

        def _line(self, trial, what: str) -> None:
            self.done += 1
            r = trial.last_result or {}
            v = r.get(self.metric)
            val = f"{v:.4g}" if isinstance(v, float) else str(v)
            self.log(f"  trial {self.done}/{self.total} {what}: {trial.trial_id} {self.metric} {val} after "
                     f"{r.get('training_iteration', 0)} report(s), {r.get('time_total_s', 0.0):.0f} s")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

    return TrialLines(log, metric, total)


def study_callbacks(cfg, name: str) -> list:
    """Ray Tune's own tracking callbacks for a study: TensorBoard event files per trial (Tune writes
    them with its default TBX logger whenever tensorboardX is installed, as it is with Ray) and, when
    tracking.mlflow_uri is set, Ray's MLflow integration (a run per trial with its config and metrics)."""
    if not cfg.mlflow_uri:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from lumo_ray.tracking import mlflow_uri

    return [MLflowLoggerCallback(tracking_uri=mlflow_uri(cfg.mlflow_uri), experiment_name=cfg.mlflow_experiment,
                                 tags={"lumo.study": name}, save_artifact=False)]
