"""Shared fixtures: one local Ray per test session, real data copied to temp dirs."""
from __future__ import annotations

import os
import shutil

# One torch thread per process: OpenMP spinning on 2 shared cores makes runs 10-30x slower, and the
# tokenize contract fixes the thread count anyway (RuntimeConfig.threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole run (never one per test)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
