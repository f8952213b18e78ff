"""A real two-node Ray cluster on this machine (separate `ray start` processes), driven only by subprocesses.

Nothing here touches the session-wide `ray_local` fixture: every Ray client runs in its own process
(`lumo ... --address`, `ray job submit`), the cluster lives under its own short temp dir with its own
auth token file, and teardown kills exactly the processes this module started (by pid), even when a
test fails. Token authentication stays on: RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH point every
node, driver and CLI at the same token file.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.manifest import read_manifest, write_manifest
from lumo_ray.data.normalize import normalize_local
from lumo_ray.data.synth import write_synth

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
# 1 CPU per loader and per tokenizer actor on two 1-CPU nodes: the job can only finish if Ray
# places work on both nodes.
TOK = ["data.tokenize.shard_size=4", "data.tokenize.batch_size=3", "data.tokenize.num_cpus_per_actor=1",
       "data.tokenize.num_cpus_per_loader=1", "data.tokenize.actors=1", "data.tokenize.loaders=1"]
SETS = [a for s in TOK for a in ("--set", s)]


def dashboard_missing() -> str | None:
    """Why the job server cannot start here (None when ray[default]'s dashboard deps are installed)."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
        return None
    except ImportError as e:
        return f"ray[default] dashboard deps missing ({e}); `ray start --include-dashboard true` refuses to start"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Free ports for every listener a node opens, so it never collides with another local Ray."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    return [a for n in names for a in (n, str(free_port()))]


def tree_bytes(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and (p.suffix == ".tar" or p.name == "index.json")}


def run(cmd: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} -> rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, start time, command line + environment) of every process we can see."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        try:  # every process of our cluster inherits RAY_AUTH_TOKEN_PATH=<our dir>/auth_token
            cmd += " " + (d / "environ").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
        out[int(d.name)] = (int(fields[1]), fields[19], cmd)
    return out


def _ours(roots: list[int], marker: str) -> dict[int, str]:
    """Descendants of our `ray start` processes plus anything whose command line or environment names
    our private dir (Ray workers rename themselves `ray::...`, and agents can outlive their raylet);
    pid -> start time."""
    table = _procs()
    mine = {pid for pid, (_, _, cmd) in table.items() if marker in cmd} | {r for r in roots if r in table}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _, _) in table.items() if ppid in mine} - mine
        mine |= kids
        grew = bool(kids)
    mine.discard(os.getpid())
    return {pid: table[pid][1] for pid in mine}


def _kill_tree(procs: list[subprocess.Popen], marker: str) -> None:
    """Stop the `ray start --block` processes (they stop their nodes), then SIGKILL whatever of
    theirs is left: only processes recorded before, matched by pid and start time."""
    ours = _ours([p.pid for p in procs], marker)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=8)
        except subprocess.TimeoutExpired:
            p.kill()
    ours.update(_ours([], marker))
    table = _procs()
    for pid, start in ours.items():
        if pid in table and table[pid][1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def work():
    """Short private dir (Unix socket paths must stay under ~107 chars) holding the token, data and Ray temp dirs."""
    d = Path(tempfile.mkdtemp(prefix="lmn", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def env(work):
    token = work / "auth_token"
    token.write_text(uuid.uuid4().hex)
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
             OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return e


@pytest.fixture(scope="module")
def manifest(work):
    """Synthetic images + audio normalized without Ray (normalize_local), one manifest."""
    write_synth(work / "synth", 6, 6, seed=3)
    cfg = load_config(LumoConfig).data.normalize
    recs = []
    for src in ("llava_pretrain", "audiocaps"):
        normalize_local(src, work / "synth" / src, work / f"norm_{src}", cfg)
        recs += read_manifest(work / f"norm_{src}" / "manifest.jsonl")[0]
    return write_manifest(recs, work / "manifest.jsonl")


@pytest.fixture(scope="module")
def local_shards(manifest, work, env):
    """Local mode (`--address local`: a fresh single-node Ray in the CLI process)."""
    out = work / "local"
    run([sys.executable, "-m", "lumo_ray.cli", "data", "tokenize", "--manifest", str(manifest), "--out", str(out),
         "--address", "local", *SETS], env)
    return out


@pytest.fixture(scope="module")
def cluster(work, env, local_shards):
    """Head (1 CPU) + second node (1 CPU, custom resource `lumo_node2`) as separate `ray start --block` processes.

    Started after the local-mode baseline so the two runs never compete for the 2 cores."""
    dash = dashboard_missing() is None
    port, dport = free_port(), free_port()
    temp = work / "ray"
    head = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
            "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(temp),
            "--include-dashboard", "true" if dash else "false", "--disable-usage-stats", *node_ports(),
            # even without the job server a minimal dashboard process binds this port (default 8265)
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dport)]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs = [subprocess.Popen(head, env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)]
    address = f"127.0.0.1:{port}"
    try:
        _wait(lambda: _tcp(port), 60, "head GCS port", logs / "head.log", procs=procs)
        node2 = [str(RAY), "start", "--block", "--address", address, "--node-ip-address", "127.0.0.1",
                 "--num-cpus", "1", "--num-gpus", "0", "--resources", json.dumps({"lumo_node2": 1}),
                 "--disable-usage-stats", *node_ports()]
        procs.append(subprocess.Popen(node2, env=env, stdout=open(logs / "node2.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        status = {}

        def two_nodes() -> bool:
            p = subprocess.run([sys.executable, "-m", "lumo_ray.cli", "status", "--address", address],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
            status["out"] = p.stdout + p.stderr
            return p.returncode == 0 and "2 alive node(s)" in p.stdout
        _wait(two_nodes, 90, "two alive nodes", logs / "node2.log", status, procs)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dport}" if dash else None,
               "status": status["out"], "temp": temp}
    finally:
        _kill_tree(procs, str(work))


def _tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait(pred, timeout: float, what: str, log: Path, extra: dict | None = None,
          procs: list[subprocess.Popen] = ()) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and all(p.poll() is None for p in procs):
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"gave up waiting for {what} (a `ray start` exited or {timeout:.0f}s passed)\n{log.read_text()[-3000:]}\n{(extra or {}).get('out', '')}")


def test_status_reports_both_nodes_and_the_config_asks(cluster):
    out = cluster["status"]
    assert f"cluster at {cluster['address']} (from --address): 2 alive node(s)" in out
    assert "(head)" in out and "lumo_node2=1" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total.split()[1:3] == ["2", "0"]  # 2 CPUs, 0 GPUs over both nodes
    assert "data.tokenize actors (codec encode)" in out and "fits:" in out
    # `ray start` recorded the cluster in its own temp dir, not /tmp/ray: a plain ray.init() elsewhere won't join it.
    assert (cluster["temp"] / "ray_current_cluster").read_text().strip().endswith(cluster["address"].split(":")[1])


def test_tokenize_driver_on_two_nodes_matches_local_mode(cluster, manifest, local_shards, work, env):
    out = work / "driver"
    p = run([sys.executable, "-m", "lumo_ray.cli", "data", "tokenize", "--manifest", str(manifest), "--out", str(out),
             "--address", cluster["address"], *SETS], env)
    assert "[tokenize] done" in p.stdout
    got, want = tree_bytes(out), tree_bytes(local_shards)
    assert len(want) > 3 and got == want


def test_tokenize_job_submit_matches_local_mode(cluster, manifest, local_shards, work, env):
    why = dashboard_missing()
    if why:
        pytest.skip(why)
    out = work / "submitted"
    p = run([str(RAY), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO), "--",
             sys.executable, "-m", "lumo_ray.cli", "data", "tokenize", "--manifest", str(manifest), "--out", str(out),
             *SETS], env, timeout=300)
    assert "succeeded" in p.stdout.lower()
    assert tree_bytes(out) == tree_bytes(local_shards)
