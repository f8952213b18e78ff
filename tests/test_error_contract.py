"""The error contract for every user input (docs/commands.md, "Errors, console and tracking"): a missing, empty or
wrong kind of input, an out-of-range value, an unknown flag or command, a config file that is not there,
a config value the codec refuses, a Ray cluster whose token this process lacks: one line on stderr,
exit 2, within 3 s, nothing written to --out, and a hint ("did you mean ...") where a near name exists.
Every case is a real `python -m lumo_ray.cli` process on real files; they run two at a time. The 3 s are
the process's CPU seconds: on a shared, loaded machine its wall time says more about the neighbours."""
from __future__ import annotations

import json
import os
from concurrent import futures
from pathlib import Path

import pytest
from test_cli_errors import run_lumo

REPO = Path(__file__).resolve().parents[1]
TOKEN = "lumo-test-token"

# id: (argv with {d} = the inputs folder, {out} = this case's --out, {gcs} = a token-auth GCS; extra env;
#      what the line must name)
CASES = {
    "verify: shards not found": (["data", "verify", "--shards", "{d}/nonexistent", "--out", "{out}"], {},
                                 ["shards", "{d}/nonexistent", "not found", "lumo data tokenize"]),
    "verify: a folder without index.json": (["data", "verify", "--shards", "{d}/folder", "--out", "{out}"], {},
                                            ["no index.json", "finished `lumo data tokenize`"]),
    "verify: shards with no samples": (["data", "verify", "--shards", "{d}/empty_shards", "--out", "{out}"], {},
                                       ["hold no samples"]),
    "tokenize: a README as manifest": (["data", "tokenize", "--manifest", str(REPO / "README.md"), "--out", "{out}"],
                                       {}, ["manifest", "not a manifest", "line 1", "lumo data normalize"]),
    "tokenize: the raw LLaVA JSON as manifest": (
        ["data", "tokenize", "--manifest", "{d}/synth/llava_pretrain/blip_laion_cc_sbu_558k.json", "--out", "{out}"],
        {}, ["a JSON document", "lumo data normalize --source"]),
    "tokenize: an image as manifest": (["data", "tokenize", "--manifest", "{d}/image.png", "--out", "{out}"], {},
                                       ["not a manifest"]),
    "tokenize: a directory as manifest": (["data", "tokenize", "--manifest", "{d}/folder", "--out", "{out}"], {},
                                          ["is a directory", "manifest.jsonl"]),
    "tokenize: the folder of a manifest": (["data", "tokenize", "--manifest", "{d}/normalized", "--out", "{out}"], {},
                                           ["is a directory", "did you mean {d}/normalized/manifest.jsonl?"]),
    "tokenize: an empty manifest": (["data", "tokenize", "--manifest", "{d}/empty.jsonl", "--out", "{out}"], {},
                                    ["is empty: no samples"]),
    "tokenize: --actors 0": (["data", "tokenize", "--manifest", "{d}/normalized/manifest.jsonl", "--out", "{out}",
                              "--actors", "0"], {}, ["--actors", "must be > 0"]),
    "tokenize: calls_per_actor 0": (["data", "tokenize", "--manifest", "{d}/normalized/manifest.jsonl", "--out",
                                     "{out}", "--set", "data.tokenize.calls_per_actor=0"], {},
                                    ["data.tokenize.calls_per_actor", "is 0", "give 1 or more"]),
    "embed: a README as manifest": (["data", "embed", "--manifest", str(REPO / "README.md"), "--out", "{out}"], {},
                                    ["not a manifest"]),
    "dedup: embeddings not found": (["data", "dedup", "--embeddings", "{d}/nonexistent", "--manifest",
                                     "{d}/normalized/manifest.jsonl", "--out", "{out}"], {},
                                    ["embeddings", "not found", "lumo data embed"]),
    "normalize: a README as JSONL records": (["data", "normalize", "--source", "jsonl", "--input",
                                              str(REPO / "README.md"), "--out", "{out}"], {},
                                             ["jsonl input", "not a manifest"]),
    "tokenizer train: a folder as --input": (["tokenizer", "train", "--input", "{d}/folder", "--vocab-size", "300",
                                              "--out", "{out}"], {}, ["--input", "is a folder, not a file"]),
    "tokenizer train: --vocab-size 0": (["tokenizer", "train", "--input", "{d}/empty.jsonl", "--vocab-size", "0",
                                         "--out", "{out}"], {}, ["--vocab-size", "must be > 0"]),
    "audit: baseline not found": (["uti", "audit", "--out", "{out}", "--baseline", "{d}/nonexistent.json"], {},
                                  ["baseline", "not found", "--write-baseline"]),
    "config value the codec refuses": (["uti", "build", "--out", "{out}", "--set", "uti.audio.bandwidth=7.0"], {},
                                       ["error: config:", "audio.bandwidth=7.0", "choose one of"]),
    "config key misspelt": (["uti", "build", "--out", "{out}", "--set", "uti.audio.bandwith=3.0"], {},
                            ["did you mean 'uti.audio.bandwidth'?"]),
    "config file not found, a near name exists": (["uti", "build", "--out", "{out}", "--config",
                                                   str(REPO / "configs/local/tiny.yml")], {},
                                                  ["not found", f"did you mean {REPO / 'configs/local/tiny.yaml'}?"]),
    "config file is a directory": (["uti", "build", "--out", "{out}", "--config", str(REPO / "configs/local")], {},
                                   ["is a directory", "tiny.yaml"]),
    "config file is not YAML": (["uti", "build", "--out", "{out}", "--config", "{d}/broken.yaml"], {},
                                ["not valid YAML at line"]),
    "synth: --images -5": (["data", "synth", "--images", "-5", "--out", "{out}"], {}, ["--images", "must be >= 0"]),
    "plan: --gpus 0": (["plan", "--gpus", "0"], {}, ["--gpus", "must be > 0"]),
    "plan: --gpu-mem abc": (["plan", "--gpu-mem", "abc"], {}, ["--gpu-mem", "expected a number"]),
    "generate: --n 0": (["generate", "--run", "{d}/folder", "--task", "t2i", "--prompt", "a red circle", "--n", "0",
                         "--out", "{out}"], {}, ["lumo generate", "--n", "must be > 0"]),
    "gate decode: --top-p 1.5": (["gate", "decode", "--run", "{d}/folder", "--top-p", "1.5", "--out", "{out}"], {},
                                 ["--top-p", "must be > 0.0 and <= 1.0, got 1.5"]),
    "serve: --port 70000": (["serve", "--run", "{d}/folder", "--port", "70000"], {}, ["--port", "<= 65535"]),
    "codec fit-kmeans: --k 0": (["codec", "fit-kmeans", "--embeddings", "{d}/folder", "--k", "0", "--out", "{out}"],
                                {}, ["--k", "must be > 0"]),
    "codec train-clip: --lr abc": (["codec", "train-clip", "--lr", "abc", "--out", "{out}"], {},
                                   ["--lr", "expected a number > 0.0, got 'abc'"]),
    "eval perplexity: --batch-size 0": (["eval", "perplexity", "--run", "{d}/folder", "--data", "{d}/empty.jsonl",
                                         "--batch-size", "0", "--out", "{out}"], {}, ["--batch-size", "must be > 0"]),
    "eval vlm-ablation: --seed -1": (["eval", "vlm-ablation", "--run", "{d}/folder", "--seed", "-1", "--out", "{out}"],
                                     {}, ["--seed", "must be >= 0, got -1"]),
    "synth: --output for --out": (["data", "synth", "--output", "{out}"], {},
                                  ["lumo data synth", "missing --out", "did you mean --out instead of --output?"]),
    "synth: --imgs": (["data", "synth", "--imgs", "4", "--out", "{out}"], {},
                      ["lumo data synth", "unknown option --imgs", "did you mean --images?"]),
    "synth: a stray argument": (["data", "synth", "--out", "{out}", "extra"], {}, ["unexpected argument 'extra'"]),
    "data without a command": (["data"], {}, ["a command is required", "tokenize", "verify"]),
    "lumo without a command": ([], {}, ["a command is required", "demo", "train"]),
    "data: misspelt command": (["data", "tokenz"], {}, ["unknown command 'tokenz'", "did you mean 'tokenize'?"]),
    "unknown top command": (["frob"], {}, ["unknown command 'frob'", "choose from demo"]),
    "normalize: --source near a choice": (["data", "normalize", "--source", "llava", "--input", "{d}",
                                           "--out", "{out}"], {}, ["did you mean 'llava_pretrain'?"]),
    "Ray cluster with token auth, no token": (["status", "--address", "{gcs}"], {},
                                              ["Ray cluster ({gcs})", "token authentication", "no token is set",
                                               "RAY_AUTH_TOKEN", "RAY_AUTH_MODE=token"]),
    "Ray cluster with token auth, wrong token": (["status", "--address", "{gcs}"], {"RAY_AUTH_TOKEN": "wrong"},
                                                 ["rejected the token from RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN to"]),
}

# CPU seconds a case may take: 3, but the codec owns which bandwidths its model has, so that check imports
# torch and transformers (about 2.4 s of CPU alone, more under contention)
CPU_BUDGET = {"config value the codec refuses": 5.0}


@pytest.fixture(scope="module")
def token_gcs():
    """A gRPC server that answers Ray's GCS cluster-id call like a token-auth cluster: UNAUTHENTICATED
    unless the call carries `authorization: Bearer <TOKEN>` (a real `ray start` takes ~15 s here)."""
    import grpc

    def cluster_id(request, context):
        if ("authorization", f"Bearer {TOKEN}") not in tuple(context.invocation_metadata()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "InvalidAuthToken: Authentication token is missing or incorrect")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "ray.rpc.NodeInfoGcsService", {"GetClusterId": grpc.unary_unary_rpc_method_handler(cluster_id)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def ran(tmp_path_factory, token_gcs):
    """Every case run once (two processes at a time): id -> (process, CPU s, wall s, its --out, the inputs)."""
    from lumo_ray.data.manifest import write_manifest
    from lumo_ray.data.normalize import read_and_dedupe
    from lumo_ray.data.synth import write_synth

    d = tmp_path_factory.mktemp("inputs")
    write_synth(d / "synth", 2, 0, seed=0)
    (d / "folder").mkdir()
    (d / "empty_shards").mkdir()
    (d / "empty_shards" / "index.json").write_text(json.dumps({"totals": {"samples": 0}, "shards": []}))
    (d / "empty.jsonl").write_text("\n")
    (d / "image.png").write_bytes(next((d / "synth" / "llava_pretrain" / "images").rglob("*.png")).read_bytes())
    (d / "normalized").mkdir()
    records = read_and_dedupe("llava_pretrain", d / "synth" / "llava_pretrain")[0]
    write_manifest(records, d / "normalized" / "manifest.jsonl")
    (d / "broken.yaml").write_text("uti: [\n")
    home = d / "home"  # no ~/.ray/auth_token
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "LUMO_DEBUG"))}
    env["HOME"] = str(home)

    def one(case):
        argv, extra, _ = CASES[case]
        out = d / "out" / case.replace(" ", "_").replace(":", "").replace(",", "")
        args = [a.format(d=d, out=out, gcs=token_gcs) for a in argv]
        return case, (*run_lumo(args, env={**env, **extra}, cwd=d), out, d)

    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_exit_2_nothing_written(ran, case, token_gcs):
    p, cpu, wall, out, d = ran[case]
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in p.stdout + p.stderr and not p.stdout.strip(), (p.stdout, err)
    assert "; " in err or "did you mean" in err, f"no what-to-do: {err}"  # <what>: <why>; <what to do>
    for needle in CASES[case][2]:
        assert needle.format(d=d, gcs=token_gcs) in err, err
    assert not out.exists(), f"wrote {sorted(p.name for p in out.rglob('*'))} before refusing"
    assert cpu < CPU_BUDGET.get(case, 3.0), f"{cpu:.1f} s of CPU ({wall:.1f} s wall)"


def test_ray_token_is_turned_on_when_the_cluster_accepts_it(token_gcs, monkeypatch):
    """With the cluster's token and RAY_AUTH_MODE unset, the check turns token mode on (Ray sends no
    token to an address otherwise); an explicit RAY_AUTH_MODE=disabled is a user error naming it."""
    from lumo_ray.cli.common import check_ray_address
    from lumo_ray.errors import UserError

    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    check_ray_address(token_gcs)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(UserError, match="RAY_AUTH_MODE=disabled; set RAY_AUTH_MODE=token"):
        check_ray_address(token_gcs)
    check_ray_address("127.0.0.1:9")  # nothing listening there: left to Ray (as a ray:// address would be)
    check_ray_address("ray://127.0.0.1:10001")


def test_rays_own_token_refusal_maps_to_the_one_line():
    """Where the check cannot tell (Ray refuses later), ray.init's ConnectionError, raised from Ray's
    AuthenticationError (text as Ray 2.60 words it), becomes the same one line; other errors do not."""
    from lumo_ray.errors import ray_auth_failure

    try:
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token "
                               "is missing or incorrect. Note: RAY_AUTH_MODE is currently 'disabled' (not 'token').")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from cause
    except ConnectionError as e:
        line = ray_auth_failure(e)
    assert line.startswith("Ray cluster (10.0.0.5:6379): it uses token authentication") and "RAY_AUTH_TOKEN" in line
    missing = RuntimeError("Token authentication is enabled but no authentication token was found. Ensure ...")
    assert "no token is set" in ray_auth_failure(missing)
    assert ray_auth_failure(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")) is None
