"""A real `lumo serve` subprocess on a tiny token-LM run, as a user starts it, for the serving tests."""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from test_generate_decode import make_tiny_run

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError, json.JSONDecodeError):  # not listening yet, or no answer in 5 s
        return False


@contextlib.contextmanager
def lumo_server(d, *sets: str, wait_s: float = 240):
    """Serve a fresh tiny run under folder `d` with the bearer token TOKEN and `--set` items `sets`; yields
    {port, run, dir, proc}. The server's own local Ray is the only one while it runs (conftest's session
    Ray is shut down and restarted after); on exit SIGINT (a clean stop takes its Ray down), then kill."""
    import ray

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    run = make_tiny_run(d / "run")
    (d / "token").write_text(TOKEN + "\n")
    port = free_port()
    cmd = [sys.executable, "-m", "lumo_ray.cli", "serve", "--run", str(run), "--port", str(port),
           "--token-file", str(d / "token")]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=d)
    try:
        deadline = time.time() + wait_s
        while not _healthy(port):
            assert p.poll() is None, p.stdout.read()[-4000:]
            if time.time() > deadline:
                p.kill()
                pytest.fail(f"lumo serve did not answer /health within {wait_s:.0f} s:\n" + p.stdout.read()[-4000:])
            time.sleep(0.5)
        yield {"port": port, "run": run, "dir": d, "proc": p}
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                p.kill()
        if was:
            from conftest import SESSION_RAY

            ray.init(**SESSION_RAY)
