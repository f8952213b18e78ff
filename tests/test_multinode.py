"""A real two-node Ray cluster on this machine (separate `ray start` processes), driven only by subprocesses.

Nothing here touches the session-wide `ray_local` fixture: every Ray client runs in its own process
(`lumo ... --address`, `ray job submit`), the cluster lives under its own short temp dir with its own
auth token file, and teardown kills exactly the processes this module started (by pid), even when a
test fails. Token authentication stays on: RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH point every
node, driver and CLI at the same token file.

Checked here: `lumo status`, tokenize (driver and `ray job submit`) byte-identical to local mode, a
submitted 2-worker Ray Train DDP job with one rank per node (placement read back from Ray's state
API), and the same job losing node2 (SIGKILL of its whole process tree) and resuming from its last
checkpoint on a replacement node. The node-loss test runs last: it leaves head + replacement.
"""
from __future__ import annotations

import json
import os
import re
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

    Started after the local-mode baseline so the two runs never compete for the 2 cores. `add_node`
    starts one more such worker node (a replacement, as an autoscaler would); teardown stops every
    node started here, replacements included."""
    dash = dashboard_missing() is None
    port, dport = free_port(), free_port()
    temp = work / "ray"
    head = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
            "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(temp),
            "--include-dashboard", "true" if dash else "false", "--disable-usage-stats", *node_ports(),
            # even without the job server a minimal dashboard process binds this port (default 8265)
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dport),
            # notice a lost node in ~3-5 s instead of 15 s or more by default (the node-loss test waits on it)
            "--system-config", json.dumps({"health_check_period_ms": 1000, "health_check_failure_threshold": 3})]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs = [subprocess.Popen(head, env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)]
    address = f"127.0.0.1:{port}"

    def add_node(name: str) -> subprocess.Popen:
        # Each node its own temp dir, as on its own machine: a node that joins while a job runs unpacks the
        # job's working_dir into <temp>/session_*/runtime_resources; in the head's, it replaced the folder
        # under a worker the head was starting, which failed, and the head waited 60 s for it to register
        # (worker_register_timeout_seconds) before starting another (the node-loss test's replacement).
        cmd = [str(RAY), "start", "--block", "--address", address, "--node-ip-address", "127.0.0.1",
               "--num-cpus", "1", "--num-gpus", "0", "--resources", json.dumps({"lumo_node2": 1}),
               "--temp-dir", str(work / f"t{len(procs)}"), "--disable-usage-stats", *node_ports()]
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(logs / f"{name}.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    try:
        _wait(lambda: _tcp(port), 60, "head GCS port", logs / "head.log", procs=procs)
        status = {}

        def two_nodes() -> bool:
            try:
                p = subprocess.run([sys.executable, "-m", "lumo_ray.cli", "status", "--address", address],
                                   env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:  # a loaded machine: ask again
                status["out"] = "lumo status timed out"
                return False
            status["out"] = p.stdout + p.stderr
            return p.returncode == 0 and "2 alive node(s)" in p.stdout
        for attempt in range(3):
            name = "node2" if attempt == 0 else f"node2_retry{attempt}"
            node = add_node(name)
            try:
                _wait(two_nodes, 150, "two alive nodes", logs / f"{name}.log", status, [procs[0], node])
                break
            except AssertionError:
                # On a loaded machine the raylet can exit at start: Ray waits a fixed 15 s for its
                # dashboard agent's port file (ray-project/ray#65983). Only that case is retried.
                if node.poll() is None or procs[0].poll() is not None or attempt == 2:
                    raise
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dport}" if dash else None,
               "status": status["out"], "temp": temp, "procs": procs, "node2": node, "add_node": add_node, "logs": logs}
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


# ------------------------------------------------------------------------------------------------
# Ray Train on both nodes: a submitted 2-worker DDP job, then the same job losing a node
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vlm_data(work) -> str:
    return write_synth(work / "vsynth", 40, 0, seed=2)["llava_pretrain_dir"]


def vlm_args(data: str, out: Path, steps: int, every: int) -> list[str]:
    """`lumo train vlm` on the tiny preset: 2 DDP workers x 1 CPU, so on two 1-CPU nodes each node gets one."""
    kv = {"vlm.data.path": data, "vlm.data.eval_size": 8, "vlm.data.golden_size": 2, "vlm.data.max_seq_len": 64,
          "vlm.llm.text_warmup_steps": 0, "vlm.train.out": out, "vlm.train.steps": steps,
          "vlm.train.global_batch": 4, "vlm.train.warmup_steps": 2, "vlm.train.ckpt_every": every,
          "vlm.train.eval_every": 0, "vlm.train.eval_batch_size": 8, "vlm.train.log_every": 1,
          "vlm.train.num_workers": 2, "vlm.train.cpus_per_worker": 1, "vlm.train.max_failures": 1}
    return ["train", "vlm", *[a for k, v in kv.items() for a in ("--set", f"{k}={v}")]]


def submit_cmd(cluster: dict, sub_id: str, args: list[str]) -> list[str]:
    return [str(RAY), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
            "--submission-id", sub_id, "--", sys.executable, "-m", "lumo_ray.cli", *args]


STATE = """
import json, sys
from ray.util.state import list_actors, list_jobs, list_nodes
addr, sub = sys.argv[1:]
job = next(j for j in list_jobs(address=addr, detail=True, limit=10000) if j.submission_id == sub)
workers = list_actors(address=addr, filters=[("job_id", "=", job.job_id), ("class_name", "=", "RayTrainWorker")],
                      detail=True, limit=10000)
nodes = list_nodes(address=addr, detail=True, limit=10000)
print(json.dumps({"workers": [{"node_id": a.node_id, "state": a.state, "pid": a.pid} for a in workers],
                  "nodes": {n.node_id: {"head": n.is_head_node, "state": n.state, "resources": n.resources_total}
                            for n in nodes}}))
"""


def ray_state(cluster: dict, env: dict, sub_id: str) -> dict:
    """From Ray's state API (dead entries included): every node, and the Ray Train worker actors of
    one submitted job with the node each ran on. One process instead of three `ray list` calls."""
    out = run([sys.executable, "-c", STATE, cluster["dashboard"], sub_id], env, timeout=120).stdout
    st = json.loads(out.strip().splitlines()[-1])
    st["head"] = next(i for i, n in st["nodes"].items() if n["head"])
    st["alive_node2"] = [i for i, n in st["nodes"].items() if "lumo_node2" in n["resources"] and n["state"] == "ALIVE"]
    return st


def steps_rows(run_dir: Path) -> list[dict]:
    p = run_dir / "steps.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def persisted_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has copied to the run's storage."""
    out = []
    for c in (run_dir / "ray" / "train").glob("checkpoint_*"):
        try:
            if (c / "state.pt").exists():
                out.append(json.loads((c / "meta.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            pass  # being copied right now
    return sorted(out)


def check_run_outputs(run_dir: Path, steps: int) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["final"]["step"] == steps and m["world_size"] == 2 and m["final"]["eval_loss"] > 0
    assert (run_dir / "export" / "model.safetensors").exists()
    assert steps in persisted_steps(run_dir)
    return m


def test_train_vlm_job_submit_ddp_spans_both_nodes(cluster, vlm_data, work, env):
    why = dashboard_missing()
    if why:
        pytest.skip(why)
    out, sub = work / "vlm_2nodes", f"lumo-vlm-{uuid.uuid4().hex[:8]}"
    p = run(submit_cmd(cluster, sub, vlm_args(vlm_data, out, steps=4, every=2)), env, timeout=300)
    (cluster["logs"] / "job_2nodes.log").write_text(p.stdout + p.stderr)
    assert "succeeded" in p.stdout.lower()
    m = check_run_outputs(out, 4)
    assert [r["step"] for r in m["steps"]] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in m["steps"])
    # Placement, from Ray's own records: one DDP rank on the head, one on node2 (the one with lumo_node2).
    st = ray_state(cluster, env, sub)
    assert len(st["alive_node2"]) == 1
    assert sorted(w["node_id"] for w in st["workers"]) == sorted([st["head"], st["alive_node2"][0]]), st
    # What `--working-dir` uploaded: the code, without .git, .venv (CI builds it inside the repo) or
    # .gitignore'd run outputs; Ray refuses packages over its gRPC message limit (512 MiB).
    pkg = re.search(r"gcs://(_ray_pkg_[0-9a-f]+)\.zip", p.stdout + p.stderr).group(1)
    files = next(cluster["temp"].glob(f"session_*/runtime_resources/working_dir_files/{pkg}"))
    top = {x.name for x in files.iterdir()}
    assert {"lumo_ray", "trainers", "pipelines", "configs"} <= top and not top & {".git", ".venv", "runs"}, top
    assert sum(f.stat().st_size for f in files.rglob("*") if f.is_file()) < 20 * 2 ** 20


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of `root` and everything below it."""
    table = _procs()
    mine = {root} & set(table)
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _, _) in table.items() if ppid in mine} - mine
        mine |= kids
        grew = bool(kids)
    return {pid: table[pid][1] for pid in mine}


def sigkill_node(proc: subprocess.Popen) -> int:
    """SIGKILL one node's `ray start --block` and everything it started (raylet, agents, its Ray workers):
    a machine that vanished, with no chance to deregister. Returns how many processes were killed."""
    tree = _descendants(proc.pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    return len(tree)


def test_train_vlm_survives_losing_a_node_and_resumes_on_a_replacement(cluster, vlm_data, work, env):
    """Kill node2 (SIGKILL, its whole process tree) after the first checkpoint; Ray Train's FailureConfig
    restarts the worker group once a replacement node joins, from the last persisted checkpoint."""
    why = dashboard_missing()
    if why:
        pytest.skip(why)
    head_proc, node2_proc = cluster["procs"][0], cluster["node2"]
    out, sub, every, steps = work / "vlm_node_loss", f"lumo-vlm-{uuid.uuid4().hex[:8]}", 6, 18
    log = cluster["logs"] / "job_node_loss.log"
    with open(log, "w") as fh:
        args = vlm_args(vlm_data, out, steps=steps, every=every) + ["--set", f"vlm.train.hold_at_step={every + 3}"]
        job = subprocess.Popen(submit_cmd(cluster, sub, args),
                               env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    try:
        # Rank 0 pauses once at step every + 3 (vlm.train.hold_at_step), past the checkpoint at `every`:
        # the kill lands at a known step whatever the machine's speed.
        t0, killed_at = time.time(), None
        while time.time() - t0 < 240 and job.poll() is None:
            ck, rows = persisted_steps(out), steps_rows(out)
            if (out / ".held_once").exists() and ck == [every]:
                killed_at = {"ckpt": ck[-1], "step": rows[-1]["step"], "n": sigkill_node(node2_proc)}
                break
            time.sleep(0.1)
        assert killed_at, f"training never held after its first checkpoint\n{log.read_text()[-3000:]}"
        # The replacement, as an autoscaler would bring up (again if its raylet dies at start, see `cluster`).
        repl, tries = cluster["add_node"]("node3"), 1
        t0 = time.time()
        while job.poll() is None and time.time() - t0 < 300:
            if repl.poll() is not None and tries < 3:
                repl, tries = cluster["add_node"](f"node3_retry{tries}"), tries + 1
            time.sleep(1)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert job.returncode == 0 and "succeeded" in text.lower(), text[-4000:]
    assert head_proc.poll() is None  # only node2 died

    rows = steps_rows(out)
    cut = next((i for i in range(1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"]), None)
    assert cut is not None, f"no restart in steps.jsonl: {[r['step'] for r in rows]}"
    first, second = rows[:cut], rows[cut:]
    assert not any(second[i]["step"] <= second[i - 1]["step"] for i in range(1, len(second)))  # one restart
    resumed = second[0]["step"] - 1
    assert [r["step"] for r in first] == list(range(1, len(first) + 1))
    assert [r["step"] for r in second] == list(range(resumed + 1, steps + 1))
    # It resumed from the checkpoint persisted before the kill, not from scratch ...
    assert resumed == killed_at["ckpt"] and resumed % every == 0 and resumed > 0, (resumed, killed_at)
    assert f"resumed at step {resumed}" in text
    # ... and exactly: the steps run twice (after the checkpoint, before the kill) give the same losses.
    again = {r["step"]: r["loss"] for r in second}
    redone = [r for r in first if r["step"] > resumed]
    assert len(redone) >= 2
    for r in redone:
        assert again[r["step"]] == pytest.approx(r["loss"], abs=1e-6), (r, again[r["step"]])
    check_run_outputs(out, steps)

    # Ray's records: the first worker group spanned head + node2 (now dead), the one that finished
    # head + the replacement.
    st = ray_state(cluster, env, sub)
    head, (node3,) = st["head"], st["alive_node2"]
    where = [w["node_id"] for w in st["workers"]]
    lost = set(where) - {head, node3}
    assert len(lost) == 1 and st["nodes"][next(iter(lost))]["state"] == "DEAD", st  # node2, the one killed
    # the restarted group ran on the live nodes with the replacement in it; Ray may pack both of its workers
    # onto the replacement (seen once in CI) or split them, so only its presence is asserted
    assert st["nodes"][head]["state"] == "ALIVE" and node3 in where and where.count(head) >= 1, st
    assert all(st["nodes"][w]["state"] == "ALIVE" for w in where if w != next(iter(lost))), st
