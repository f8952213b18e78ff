"""Shared fixtures: one local Ray per test session, real data copied to temp dirs, a local S3 server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

# One torch thread per process: OpenMP spinning on 2 shared cores makes runs 10-30x slower, and the
# tokenize contract fixes the thread count anyway (RuntimeConfig.threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray workers inherit the environment Ray was started with, and the session's Ray starts after
# collection: the local S3 server's (fake) credentials must be set now for tasks and Train workers.
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
               ("AWS_EC2_METADATA_DISABLED", "true")):
    os.environ.setdefault(_k, _v)
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("LUMO_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """A private copy of ../shared/data/real (tests never write to shared/)."""
    if not REAL.exists():
        pytest.fail(f"real data not found at {REAL} (set LUMO_REAL_DATA)")
    dst = tmp_path_factory.mktemp("real") / "real"
    shutil.copytree(REAL, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


# Two fake GPUs: Ray hands out their ids, torch finds no CUDA and computes on CPU, so each job's GPU
# request is tested end to end on this CPU machine (tests/test_gpu_requests.py); CPU-only jobs never see them.
SESSION_RAY = dict(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole run (never one per test)."""
    import ray

    if not ray.is_initialized():
        ray.init(**SESSION_RAY)
    yield ray
    ray.shutdown()


S3_BUCKET = "lumo"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port and a bucket; yields uri(prefix) -> s3://... URI."""
    try:
        import moto.server  # noqa: F401  (moto[server]: flask, werkzeug; in the [test] extra)
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"needs a local S3 server: pip install 'moto[server]' ({e})")
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"moto server did not start on port {port} (see {log.name})")
                time.sleep(0.2)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield lambda prefix: f"s3://{S3_BUCKET}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def sole_local_ray():
    """A `lumo` subprocess's own local Ray is the only one on the machine while it runs: with several,
    Ray Train's placement-group cleaner cannot tell which is its cluster and dies with a traceback (Ray
    2.60; a user running two at once gives --address). The session's Ray, if up, comes back afterwards."""
    import ray

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    yield
    if was:
        ray.init(**SESSION_RAY)
