"""cluster/: the launcher YAML and KubeRay manifests parse, carry the required fields, name real `lumo`
commands and config keys, and their resources fit what the jobs ask for. Also `lumo status` with no cluster."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from lumo_ray.cli import build_parser
from lumo_ray.config import LumoConfig, load_config
from pipelines.status import config_asks, fit_problems, run_status

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "launcher.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
DOC = REPO / "docs" / "cluster.md"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load(p: Path) -> dict:
    return yaml.safe_load(p.read_text())


def lumo_commands(text: str) -> list[str]:
    """Every `lumo ...` command line in a file (shell continuations joined, comment markers stripped)."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    cmds = []
    for line in text.splitlines():
        m = re.search(r"(?:^|[\s`>-])(lumo (?:data|demo|status|uti|train|eval|tune|tokenizer|generate|serve)\b"
                      r"[^`#\n]*)", line)
        if m and " --" in m.group(1):  # a command, not prose naming one (`lumo data normalize` probe tasks)
            cmds.append(m.group(1).strip())
    return cmds


def check_parses(cmd: str) -> None:
    argv = shlex.split(cmd)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"not a valid lumo command: {cmd}")
    load_config(LumoConfig, None, getattr(args, "set", []))  # every --set key is a real config key


def test_launcher_validates_against_rays_schema_and_has_the_three_node_types():
    cfg = load(LAUNCHER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the launcher's own schema (ray up runs the same check)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["provider"]["type"] == "aws"
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # drivers only
    cpu = [t for n, t in types.items() if n != cfg["head_node_type"] and not t["resources"].get("GPU")]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and gpu
    for t in cpu + gpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] and t["resources"]["CPU"] > 0
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in cpu + gpu)


def test_launcher_installs_pinned_torch_and_the_project_and_enables_token_auth():
    cfg = load(LAUNCHER)
    for section in ("head_setup_commands", "worker_setup_commands"):
        steps = cfg["setup_commands"] + cfg[section]
        joined = "\n".join(steps)
        assert re.search(r"pip install .*torch==2\.13\.0", joined), section
        assert re.search(r"pip install .*-e ~/lumo_ray", joined), section
        # torch comes before the project, so the project install never re-resolves it
        t = next(i for i, s in enumerate(steps) if "torch==" in s)
        p = next(i for i, s in enumerate(steps) if "-e ~/lumo_ray" in s)
        assert t < p
    setup = "\n".join(cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "torchaudio" not in setup and f"ray[default,data,train,tune]=={ray.__version__}" in setup
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in s for s in starts if "ray start" in s)
    assert cfg["file_mounts"]["~/lumo_ray"] == "."


def _check_raycluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion != installed ray"
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams are map[string]string"
    assert head["rayStartParams"]["num-cpus"] == "0"
    c = head["template"]["spec"]["containers"][0]
    assert c["name"] and c["image"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["dashboard"] == 8265
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(names)) == len(names) and all(DNS1123.match(n) for n in names)
    for g in spec["workerGroupSpecs"]:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        wc = g["template"]["spec"]["containers"]
        assert wc and all(x["name"] and x["image"] for x in wc)
        res = wc[0]["resources"]
        assert res["requests"] == res["limits"], f"{g['groupName']}: Ray advertises limits; keep requests equal"
    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, f"{where}: no GPU worker group"


def test_raycluster_has_the_fields_kuberay_requires():
    m = load(RAYCLUSTER)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayCluster" and DNS1123.match(m["metadata"]["name"])
    _check_raycluster_spec(m["spec"], "raycluster.yaml")


def test_rayjob_has_the_fields_kuberay_requires_and_a_real_entrypoint():
    m = load(RAYJOB)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob" and DNS1123.match(m["metadata"]["name"])
    spec = m["spec"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    _check_raycluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= {"working_dir", "env_vars", "py_modules", "pip"} and "working_dir" in env
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert spec["entrypoint"].startswith("lumo data tokenize")
    check_parses(spec["entrypoint"])


def test_rayservice_has_the_fields_kuberay_requires_and_builds_the_lumo_serve_application(tmp_path):
    """serveConfigV2 is Serve's own config schema; its import path is the builder `lumo serve` uses,
    and its args build a real application (bound, not deployed) over a run directory."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    m = load(RAYSERVICE)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService" and DNS1123.match(m["metadata"]["name"])
    _check_raycluster_spec(m["spec"]["rayClusterConfig"], "rayservice.yaml")
    ports = {p["name"]: p["containerPort"] for p in
             m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(m["spec"]["serveConfigV2"]))
    assert serve_cfg.http_options.port == ports["serve"] and serve_cfg.http_options.host == "0.0.0.0"
    (app,) = serve_cfg.applications
    mod, fn = app.import_path.split(":")
    builder = getattr(importlib.import_module(mod), fn)
    assert [d.name for d in app.deployments] == ["Generator"]
    token = tmp_path / "token"
    token.write_text("t\n")
    args = {**app.args, "set": [s if not s.startswith("serve.token_file=") else f"serve.token_file={token}"
                                for s in app.args["set"]]}
    load_config(LumoConfig, None, args["set"])  # every key is a real config key
    bound = builder(args)
    assert type(bound).__name__ == "Application"
    with pytest.raises(ValueError, match="need 'run'"):
        builder({"config": None})


def test_every_lumo_command_in_cluster_files_and_the_guide_parses():
    found = {}
    for p in (LAUNCHER, RAYCLUSTER, RAYJOB, DOC):
        found[p.name] = lumo_commands(p.read_text())
        for cmd in found[p.name]:
            check_parses(cmd)
    assert all(found[n] for n in ("launcher.yaml", "rayjob.yaml", "cluster.md")), found
    assert any(c.startswith("lumo status") for c in found["cluster.md"])


def _offer_from_rayjob() -> dict:
    """The cluster the RayJob creates, at its `replicas`, as `lumo status` would describe it."""
    spec = load(RAYJOB)["spec"]["rayClusterSpec"]
    nodes = [{"cpus": 0.0, "gpus": 0.0}]  # head: num-cpus 0
    for g in spec["workerGroupSpecs"]:
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [{"cpus": float(lim["cpu"]), "gpus": float(lim.get("nvidia.com/gpu", 0))}] * g["replicas"]
    return {"nodes": nodes}


def test_rayjob_cluster_fits_its_own_entrypoint_and_status_flags_what_does_not():
    args = build_parser().parse_args(shlex.split(load(RAYJOB)["spec"]["entrypoint"])[1:])
    cfg = load_config(LumoConfig, None, args.set)
    asks = [a for a in config_asks(cfg) if a["what"].startswith("data.tokenize")]
    offer = _offer_from_rayjob()
    assert asks[1]["gpus"] == 0.5 and fit_problems(asks, offer) == []
    too_many = load_config(LumoConfig, None, args.set + ["data.tokenize.actors=5"])
    problems = fit_problems([a for a in config_asks(too_many) if a["what"].startswith("data.tokenize")], offer)
    assert problems == ["data.tokenize.num_gpus_per_actor: 5 x 0.5 GPU = 2.5 GPUs asked (data.tokenize actors "
                        "(codec encode)), the cluster has 2"]


def test_launcher_gpu_type_matches_the_kuberay_gpu_group():
    lgpu = next(t for t in load(LAUNCHER)["available_node_types"].values() if t["resources"].get("GPU"))
    for m in (load(RAYCLUSTER)["spec"], load(RAYJOB)["spec"]["rayClusterSpec"]):
        g = next(g for g in m["workerGroupSpecs"] if g["groupName"] == "gpu")
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert (float(lim["cpu"]), float(lim["nvidia.com/gpu"])) == (lgpu["resources"]["CPU"], lgpu["resources"]["GPU"])


def test_status_without_a_cluster_reports_local_mode_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` address file here
    lines = []
    was_up = ray.is_initialized()  # another test module may own the session's local Ray
    rep = run_status(load_config(LumoConfig), None, log=lines.append)
    assert rep["offer"]["address"] is None and rep["problems"] == []
    assert lines[0].startswith("no cluster reachable") and "local mode would start" in lines[0]
    assert rep["offer"]["nodes"][0]["cpus"] == os.cpu_count()
    assert ray.is_initialized() == was_up
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # stale: nothing listens there
    assert "stale" in run_status(load_config(LumoConfig), None, log=lines.append)["source"]


def test_status_cli_exit_codes_for_unreachable_address_and_strict_misfit(tmp_path):
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path), PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    lumo = [sys.executable, "-m", "lumo_ray.cli", "status"]
    p = subprocess.run(lumo + ["--address", "127.0.0.1:1"], env=env, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1 and "no Ray cluster answers at 127.0.0.1:1 (from --address)" in p.stderr
    p = subprocess.run(lumo + ["--strict", "--set", "data.tokenize.num_gpus_per_actor=1"], env=env,
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1 and "DOES NOT FIT: data.tokenize.num_gpus_per_actor: 1 x 1 GPU" in p.stdout
    p = subprocess.run(lumo + ["--strict"], env=env, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0 and "fits: every request group can be scheduled" in p.stdout
