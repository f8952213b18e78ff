"""Each job takes its CPUs / GPUs from its config section (lumo_ray/resources.py) and runs on the device Ray
gave it. The session's Ray declares 2 fake GPUs (conftest): a unit that asks for one gets a GPU id from
Ray, finds no CUDA and computes on CPU, so it must write the bytes of the CPU run; a request beyond the
2 GPUs is refused before any actor starts, with one line naming its config key (`lumo` exits 2)."""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from lumo_ray.cli import main
from lumo_ray.codecs.text import TINY_CORPUS
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.errors import UserError
from lumo_ray.resources import job_resources, train_resources
from lumo_ray.runtime import assigned_device
from pipelines.status import misfit
from test_generate_decode import make_tiny_run

NODE = {"cpus": 2.0, "gpus": 2.0, "custom": {"accelerator_type:A100": 1.0}}


# ------------------------------------------------------------------------------------------------
# The mechanism, without Ray
# ------------------------------------------------------------------------------------------------

def test_the_device_follows_what_ray_gave(monkeypatch):
    assert assigned_device([], "0,1") == torch.device("cpu")
    assert assigned_device(["1"], "0,1") == torch.device("cpu")  # a GPU id, but no CUDA here: CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert assigned_device([], "0,1") == torch.device("cpu")  # no GPU given: CPU even where CUDA works
    assert assigned_device(["1"], "0,1") == torch.device("cuda:1")  # the local index of Ray's id
    assert assigned_device(["3"], "3") == torch.device("cuda:0")


def test_each_job_reads_its_section_and_over_asking_names_the_key():
    cfg = load_config(LumoConfig, None, ["data.tokenize.num_gpus_per_actor=0.5", "data.tokenize.actors=6",
                                         "data.embed.num_cpus_per_actor=4", "generate.num_gpus_per_actor=1",
                                         "generate.accelerator_type=H100", "serve.gpus_per_replica=1",
                                         "serve.replicas=2", "lm.train.use_gpu=true", "lm.train.num_workers=3"])
    tok, emb, gen, srv = (job_resources(cfg, j)[-1] for j in ("tokenize", "embed", "generate", "serve"))
    assert tok.ray_options() == {"num_cpus": 0.5, "num_gpus": 0.5} and job_resources(cfg, "tokenize", 2)[1].count == 2
    assert gen.ray_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "H100"}
    assert srv.ray_options() == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert job_resources(cfg, "tokenize")[0].ray_options() == {"num_cpus": 0.5}  # loaders: CPU only
    nodes = [NODE]
    assert str(misfit(tok, nodes)).startswith("data.tokenize.num_gpus_per_actor: 6 x 0.5 GPU = 3 GPUs asked "
                                              "(data.tokenize actors (codec encode)), the cluster has 2; lower it "
                                              "or data.tokenize.actors")
    assert str(misfit(emb, nodes)).startswith("data.embed.num_cpus_per_actor: one of the data.embed actors "
                                              "(CLIP embed) asks 4 CPUs, the largest node has 2")
    assert str(misfit(gen, nodes)).startswith("generate.accelerator_type: generate actors (batch generation) ask "
                                              "for 'H100' GPUs, no node has that type (here: A100)")
    assert misfit(srv, nodes) is None  # 2 replicas x 1 GPU fit 2 GPUs
    train = train_resources(cfg.lm.train, "lm.train")
    assert str(misfit(train, nodes)).startswith("lm.train.use_gpu: 3 x 1 GPU = 3 GPUs asked (lm.train workers), "
                                                "the cluster has 2; lower it or lm.train.num_workers")
    assert all(isinstance(misfit(r, nodes), (UserError, type(None))) for r in (tok, emb, gen, srv, train))
    split = [{"cpus": 8.0, "gpus": 0.0}, {"cpus": 4.0, "gpus": 1.0}]  # the big node has no GPU
    wide = train_resources(load_config(LumoConfig, None, ["vlm.train.use_gpu=true", "vlm.train.num_workers=1",
                                                          "vlm.train.cpus_per_worker=8"]).vlm.train, "vlm.train")
    assert str(misfit(wide, split)).startswith("vlm.train.cpus_per_worker: one of the vlm.train workers asks 8 CPUs "
                                               "+ 1 GPU, no node has both (its GPU nodes have 4 CPUs at most)")


# ------------------------------------------------------------------------------------------------
# Each job on the fake-GPU Ray
# ------------------------------------------------------------------------------------------------

def tree(out: Path, skip: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of the files under `out`: all but `skip`, or those whose name ends with one of `only`."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in skip and (not only or p.name.endswith(only))}


def refused(capsys, argv: list[str], key: str) -> str:
    """`lumo argv` exits 2 with one line that names `key`; returns the line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {key}: ") and "the cluster has 2" in err, err
    return err


@pytest.fixture(scope="module")
def run_and_manifest(tmp_path_factory):
    from lumo_ray.data.manifest import write_manifest
    from lumo_ray.data.normalize import read_and_dedupe
    from lumo_ray.data.synth import write_synth

    d = tmp_path_factory.mktemp("gpu")
    write_synth(d / "synth", 4, 0, seed=5)
    write_manifest(read_and_dedupe("llava_pretrain", d / "synth" / "llava_pretrain")[0], d / "manifest.jsonl")
    return make_tiny_run(d / "run"), d / "manifest.jsonl"


@pytest.mark.parametrize("job", ["tokenize", "embed"])
def test_data_actors_asking_beyond_the_gpus_are_refused(job, run_and_manifest, tmp_path, ray_local, capsys,
                                                        monkeypatch):
    """(Their GPU actors writing the CPU bytes: the actor-count tests of test_tokenize_verify.py and
    test_embed.py run their 2 actors on the 2 fake GPUs, with no extra run.)"""
    import ray.data

    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: pytest.fail("a dataset was built"))
    refused(capsys, ["data", job, "--manifest", str(run_and_manifest[1]), "--out", str(tmp_path / "over"),
                     "--set", f"data.{job}.num_gpus_per_actor=3"], f"data.{job}.num_gpus_per_actor")


def test_batch_generation_actors_get_gpus_and_write_the_cpu_bytes(run_and_manifest, tmp_path, ray_local, capsys,
                                                                  monkeypatch):
    """The reference is each record generated in this process on CPU (lumo_ray/batch_generate.py: what an
    actor does per record), so no second actor pool starts."""
    from lumo_ray.batch_generate import applicable, generate_record
    from lumo_ray.data.manifest import read_manifest
    from lumo_ray.generate import GenOptions, load_run
    from lumo_ray.runtime import torch_threads
    from pipelines.batch_generate import run_batch_generate

    run, manifest = run_and_manifest
    out, log = tmp_path / "gpu", []
    run_batch_generate(str(manifest), str(run), "t2i", out, GenOptions(seed=1), unit_size=2,
                       cfg=load_config(LumoConfig, None, ["generate.num_gpus_per_actor=1"]), log=log.append)
    placed = next(x for x in log if x.startswith("[generate] actors computed on"))
    assert placed.startswith("[generate] actors computed on: cpu (Ray GPU ids ") and "ids none" not in placed
    local, rows = load_run(run), [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    with torch_threads(1):
        ref = [generate_record(local, "t2i", i, r, GenOptions(seed=1), 1)
               for i, r in applicable(read_manifest(str(manifest))[0], "t2i")[0]]
    assert rows == [row for row, _ in ref] and len(rows) == 4 and sum(len(f) for _, f in ref) == 4
    assert all((out / name).read_bytes() == data for _, files in ref for name, data in files.items())

    import ray.data

    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: pytest.fail("a dataset was built"))
    refused(capsys, ["generate", "--manifest", str(manifest), "--run", str(run), "--task", "t2i",
                     "--out", str(tmp_path / "over"), "--set", "generate.num_gpus_per_actor=3"],
            "generate.num_gpus_per_actor")


def test_serve_replicas_get_gpus_and_answer_the_cpu_bytes(run_and_manifest, tmp_path, ray_local, capsys,
                                                          monkeypatch):
    from ray import serve

    from lumo_ray.generate import GenOptions, generate, load_run
    from servers.generate import bind

    run = run_and_manifest[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(LumoConfig, None, ["serve.gpus_per_replica=1"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(bind(cfg, str(run)), name="gpu", route_prefix="/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=120) as r:
            replica = json.loads(r.read())["replica"]
        body = json.dumps({"task": "t2i", "prompt": "two red circles on the left", "seed": 3}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body),
                                    timeout=120) as r:
            got = json.loads(r.read())["results"][0]
    finally:
        serve.shutdown()
    assert replica["device"] == "cpu" and len(replica["ray_gpu_ids"]) == 1
    ref = generate(load_run(run), "t2i", tmp_path / "ref", prompt="two red circles on the left",
                   opts=GenOptions(seed=3), log=lambda *a: None)
    assert got["ids"] == ref[0]["ids"]
    assert base64.b64decode(got["png_base64"]) == (tmp_path / "ref" / "t2i-000.png").read_bytes()

    monkeypatch.setattr(serve, "start", lambda *a, **k: pytest.fail("Serve was started"))
    refused(capsys, ["serve", "--run", str(run), "--replicas", "3", "--set", "serve.gpus_per_replica=1"],
            "serve.gpus_per_replica")


LM = ["lm.train.steps=3", "lm.train.eval_every=3", "lm.train.log_every=1000", "lm.seq_len=32", "lm.train.global_batch=4",
      "lm.eval_fraction=0.2", "tracking.tensorboard=false", f"lm.inputs=[{TINY_CORPUS}]"]


def test_train_workers_get_gpus_and_train_the_cpu_weights(tmp_path, ray_local, capsys, monkeypatch):
    """The reference CPU run is the same loop in this process (trainers/context.py LocalContext): a Ray Train
    run on CPU would cost a second worker-group start for the same bytes."""
    from trainers.context import LocalContext
    from trainers.lm import lm_loop

    lm_loop(load_config(LumoConfig, None, LM + [f"lm.out={tmp_path / 'cpu'}"]), LocalContext())
    capsys.readouterr()
    assert main(["train", "lm", "--out", str(tmp_path / "gpu"), *(x for s in LM for x in ("--set", s)),
                 "--set", "lm.train.use_gpu=true"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[train] lm.train rank 0 computed on"))
    assert line.startswith("[train] lm.train rank 0 computed on cpu (Ray GPU ids ") and "ids none" not in line
    m = {k: json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("cpu", "gpu")}
    assert m["gpu"]["loss_history"] == m["cpu"]["loss_history"] and m["gpu"]["eval_loss"] == m["cpu"]["eval_loss"]
    assert tree(tmp_path / "gpu" / "export") == tree(tmp_path / "cpu" / "export")

    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", lambda *a, **k: pytest.fail("a trainer was built"))
    refused(capsys, ["train", "lm", "--out", str(tmp_path / "over"), *(x for s in LM for x in ("--set", s)),
                     "--set", "lm.train.use_gpu=true", "--set", "lm.train.num_workers=3"], "lm.train.use_gpu")


@pytest.fixture
def lm_shards(tmp_path_factory, ray_local) -> Path:
    """The token-LM tests' synthetic shards (test_fsdp.py's and others': one folder, built once per session)."""
    from pipelines.synth_shards import build_synth_shards

    return build_synth_shards(tmp_path_factory.getbasetemp() / "lm_synth12_e400", 12, 12,
                              overrides=["data.normalize.eval_permille=400"], log=lambda *a, **k: None)[0]


@pytest.mark.parametrize("job", ["normalize", "verify"])
def test_cpu_tasks_asking_beyond_a_node_are_refused(job, run_and_manifest, tmp_path, ray_local, capsys, monkeypatch,
                                                    request):
    """normalize / verify reserve data.<job>.num_cpus_per_task per Ray Data task: a task no node can hold is
    refused before any dataset is built (their normal runs are test_normalize.py / test_tokenize_verify.py)."""
    import ray.data

    src = run_and_manifest[1].parent / "synth" / "llava_pretrain"
    # verify reads the shard index before Ray: a shard set to check, the session's token-LM shards (no
    # tokenize of its own: in the suite test_fsdp.py has built them)
    argv = (["data", "normalize", "--source", "llava_pretrain", "--input", str(src)] if job == "normalize" else
            ["data", "verify", "--shards", str(request.getfixturevalue("lm_shards"))])
    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: pytest.fail("a dataset was built"))
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "out"), "--set", f"data.{job}.num_cpus_per_task=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: data.{job}.num_cpus_per_task: ") \
        and "asks 64 CPUs, the largest node has" in err, err
