"""gs:// URIs end to end, against a real local GCS emulator (the pure-Python `gcp-storage-emulator`):
Loc operations on gs://, and tokenize to gs:// giving the bytes a local run gives, read back by
ShardDataset and by download_dir.

pyarrow's GCS URIs take `scheme`, `endpoint_override`, `location` and `retry_limit_seconds` query
options; anonymous access (no credential lookup, which offline would wait on the GCE metadata server)
is the user part of the URI: `gs://anonymous@bucket/prefix?...`. Ray workers rebuild the filesystem
from the URI string, so they need no credentials either."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from urllib.parse import urlsplit

import pytest

from lumo_ray.cli import main
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.manifest import read_manifest, write_manifest
from lumo_ray.data.shard_reader import ShardDataset
from lumo_ray.data.shards import load_index
from lumo_ray.data.synth import write_synth
from lumo_ray.storage import download_dir, locate
from pipelines.normalize import run_normalize
from pipelines.tokenize import run_tokenize

BUCKET = "lumo"
DATA = ["data.normalize.eval_permille=400", "data.tokenize.shard_size=4", "data.tokenize.batch_size=4"]
HAVE_EMULATOR = find_spec("gcp_storage_emulator") is not None


def sets(items):
    return [x for c in items for x in ("--set", c)]


def tree(root) -> dict[str, bytes]:
    """Relative name -> bytes of every file under a local path or URI."""
    base = locate(root)
    return {p.path[len(base.path) + 1:]: p.read_bytes() for p in base.glob("*")}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """An in-memory GCS emulator on a free local port with one bucket; yields uri(prefix) -> gs://..."""
    if not HAVE_EMULATOR:
        pytest.skip("needs a local GCS emulator: pip install gcp-storage-emulator")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1",
                             "--port", str(port), "--default-bucket", BUCKET, "--in-memory"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"GCS emulator did not start on port {port} (see {log.name})")
                time.sleep(0.1)
        # retry_limit_seconds: a failing call surfaces in seconds, not after the client's 15-minute default
        yield lambda prefix: (f"gs://anonymous@{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"
                              f"&retry_limit_seconds=5")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_loc_round_trip_on_gs(gcs):
    root = locate(gcs("loc"))
    query = urlsplit(str(root)).query
    assert str(root).startswith("gs://anonymous@lumo/loc?") and "endpoint_override=" in query
    f = root / "a" / "x.bin"
    assert not f.exists() and not root.exists()
    payload = bytes(range(256)) * 40
    f.write_bytes(payload)
    assert f.read_bytes() == payload and f.size() == len(payload)
    assert f.exists() and f.is_file() and not f.is_dir()
    assert (root / "a").is_dir() and not (root / "a").is_file() and root.is_dir()
    (root / "a" / "b" / "note.txt").write_text("héllo")
    assert (root / "a" / "b" / "note.txt").read_text() == "héllo"
    (root / "top.json").write_text("{}")

    # glob: relative names under the prefix, '*' spans '/', children keep the URI's query string
    everything = root.glob("*")
    assert [c.path[len(root.path) + 1:] for c in everything] == ["a/b/note.txt", "a/x.bin", "top.json"]
    assert all(str(c).endswith("?" + query) and str(c).startswith("gs://anonymous@lumo/loc/") for c in everything)
    assert [c.name for c in root.glob("a/*.bin")] == ["x.bin"]
    assert str(root.glob("a/b/*")[0]) == f"gs://anonymous@lumo/loc/a/b/note.txt?{query}"
    # a child Loc named by its URI string resolves to the same object
    assert locate(str(everything[1])).read_bytes() == payload

    # write_atomic: the final key holds the bytes and no .tmp key is left; overwriting works too
    out = root / "c" / "index.json"
    out.write_atomic('{"v": 1}')
    out.write_atomic(b'{"v": 2}')
    assert json.loads(out.read_text()) == {"v": 2}
    assert [c.name for c in (root / "c").glob("*")] == ["index.json"]
    assert not any(c.name.endswith(".tmp") for c in root.glob("*"))

    # a failing body never touches the final key
    with pytest.raises(RuntimeError):
        with out.atomic_writer() as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    assert json.loads(out.read_text()) == {"v": 2}
    assert (root / "c" / "index.json.tmp").read_bytes() == b"partial"  # what a failed write leaves
    (root / "c" / "index.json.tmp").unlink()

    # unlink, then rmtree of a prefix takes every object below it and nothing beside it
    (root / "top.json").unlink()
    assert not (root / "top.json").exists()
    (root / "a").rmtree()
    assert not (root / "a").exists() and not f.exists()
    assert [c.name for c in root.glob("*")] == ["index.json"]
    # mkdir writes directory marker objects: glob does not list them, rmtree removes them too
    (root / "m" / "n").mkdir()
    assert (root / "m" / "n").is_dir() and [c.name for c in root.glob("*")] == ["index.json"]
    root.rmtree()
    assert not root.exists() and root.glob("*") == []
    root.rmtree()  # a missing directory is fine


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local, gcs):
    """Synthetic manifest, a local-path tokenize run, and a gs:// one via the CLI (manifest on gs:// too)."""
    d = tmp_path_factory.mktemp("gcs_data")
    cfg = load_config(LumoConfig, None, DATA)
    write_synth(d / "synth", 8, 8, seed=5)
    recs = []
    for src in ("llava_pretrain", "audiocaps"):
        run_normalize(src, d / "synth" / src, d / f"norm_{src}", cfg.data.normalize)
        recs += read_manifest(d / f"norm_{src}" / "manifest.jsonl")[0]
    manifest = write_manifest(recs, d / "manifest.jsonl")
    gs_manifest = gcs("in/manifest.jsonl")
    locate(gs_manifest).write_bytes(manifest.read_bytes())
    run_tokenize(manifest, cfg, d / "shards", log=lambda *a, **k: None)
    assert main(["data", "tokenize", "--manifest", gs_manifest, "--out", gcs("shards"), *sets(DATA)]) == 0
    return {"dir": d, "local": d / "shards", "uri": gcs("shards")}


def test_tokenize_to_gs_same_bytes_as_local(data):
    local, remote = tree(data["local"]), tree(data["uri"])
    assert any(n.endswith(".tar") for n in remote) and "index.json" in remote
    index = load_index(data["uri"])
    assert index["totals"]["shards"] >= 4 and {s["split"] for s in index["shards"]} == {"train", "eval"}
    assert set(local) == set(remote) and not any(k.endswith(".tmp") for k in remote)
    # every file the same bytes, except source.json (it names where the manifest was read from)
    assert {k for k in local if local[k] != remote[k]} == {"source.json"}
    assert json.loads(remote["source.json"])["manifest"].startswith("gs://anonymous@lumo/in/manifest.jsonl?")
    # download_dir brings the same tree back to a local directory
    got = download_dir(data["uri"], data["dir"] / "downloaded")
    assert {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()} == remote


def test_reader_reads_gs_shards_like_local(data):
    for split in ("train", "eval"):
        a = list(ShardDataset(data["local"], split, seed=3, rank=0, world_size=2))
        b = list(ShardDataset(data["uri"], split, seed=3, rank=0, world_size=2))
        assert a and [s["json"]["id"] for s in a] == [s["json"]["id"] for s in b]
        assert all((x["text"] == y["text"]).all() for x, y in zip(a, b))


def test_run_dir_mirror_on_gs(gcs, tmp_path):
    """A run directory on gs:// (prefixes written without directory markers): the staging copy is
    uploaded without checkpoints, the read cache fetches it back and follows a removed file."""
    import os

    from lumo_ray.storage import RunDir, fetch_run, output_dir
    run = RunDir(gcs("runs/r1"))
    for rel in ("metrics.json", "export/config.json", "export/model.safetensors", "checkpoints/step-1/state.pt"):
        (run.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.local / rel).write_text(rel)
    run.push()
    assert sorted(tree(run.loc)) == ["export/config.json", "export/model.safetensors", "metrics.json"]
    got = fetch_run(str(run.loc / "export"))
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "model.safetensors"]
    (run.loc / "export" / "model.safetensors").unlink()
    assert sorted(p.name for p in fetch_run(str(run.loc / "export")).iterdir()) == ["config.json"]
    with output_dir(gcs("reports/a")) as out:
        (out / "report.json").write_text("{}")
    assert tree(gcs("reports/a")) == {"report.json": b"{}"} and not out.exists()
    assert str(os.getpid()) in run.local.name
    run.discard()
    assert not run.local.exists() and not list(run.local.parent.glob(run.local.name + "*"))
