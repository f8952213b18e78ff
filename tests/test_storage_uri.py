"""Object-store URIs end to end, against a real local S3 server (moto in server mode): tokenize to
s3:// gives the bytes a local run gives, a re-run skips every shard, verify reads (and fails on a
corrupted) shard on s3, the token LM trains on s3 shards with Ray Train checkpoints on an s3
storage_path, then resumes from there in a fresh run directory, and whole run directories (base LM,
token LM, eval reports, generations) live on s3."""
import hashlib
import json
import os
import time

import pytest
import torch

from lumo_ray.cli import main
from lumo_ray.codecs.text import TINY_CORPUS
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.manifest import read_manifest, write_manifest
from lumo_ray.data.shard_reader import ShardDataset
from lumo_ray.data.shards import load_index
from lumo_ray.data.synth import write_synth
from lumo_ray.storage import locate, runs_root
from pipelines.normalize import run_normalize
from pipelines.tokenize import run_tokenize
from trainers.checkpoint import load_state
from trainers.context import LocalContext
from trainers.token_lm import token_lm_loop

DATA = ["data.normalize.eval_permille=400", "data.tokenize.shard_size=4", "data.tokenize.batch_size=4",
        "data.verify.retokenize_n=4", "data.verify.decode_spot_checks=1"]
LM = ["token_lm.train.global_batch=4", "token_lm.train.warmup_steps=1", "token_lm.train.eval_every=2",
      "token_lm.train.ckpt_every=2", "token_lm.train.log_every=2", "token_lm.train.cpus_per_worker=0.5",
      "token_lm.seq.max_audio_tokens=60"]


def sets(items):
    return [x for c in items for x in ("--set", c)]


def tree(root) -> dict[str, bytes]:
    """Relative name -> bytes of every file under a local path or URI."""
    base = locate(root)
    return {p.path[len(base.path) + 1:]: p.read_bytes() for p in base.glob("*")}


def without_source(t: dict) -> dict:
    """source.json names where the manifest was read from; everything else is location-free."""
    return {k: v for k, v in t.items() if k != "source.json"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local, s3):
    """Synthetic manifest (local and copied to s3), a local-path tokenize run, and an s3 one via the CLI."""
    d = tmp_path_factory.mktemp("uri")
    cfg = load_config(LumoConfig, None, DATA)
    write_synth(d / "synth", 8, 8, seed=5)
    recs = []
    for src in ("llava_pretrain", "audiocaps"):
        run_normalize(src, d / "synth" / src, d / f"norm_{src}", cfg.data.normalize)
        recs += read_manifest(d / f"norm_{src}" / "manifest.jsonl")[0]
    manifest = write_manifest(recs, d / "manifest.jsonl")
    s3_manifest = s3("in/manifest.jsonl")
    locate(s3_manifest).write_bytes(manifest.read_bytes())
    run_tokenize(manifest, cfg, d / "shards", log=lambda *a, **k: None)
    t0 = time.time()
    rc = main(["data", "tokenize", "--manifest", s3_manifest, "--out", s3("shards"), *sets(DATA)])
    assert rc == 0
    return {"dir": d, "local": d / "shards", "uri": s3("shards"), "secs": time.time() - t0}


def test_tokenize_to_s3_same_bytes_and_rerun_skips(data, capsys):
    local, remote = tree(data["local"]), tree(data["uri"])
    assert any(n.endswith(".tar") for n in remote) and "index.json" in remote
    n = load_index(data["uri"])["totals"]["shards"]
    assert n >= 4 and {s["split"] for s in load_index(data["uri"])["shards"]} == {"train", "eval"}
    # every file the same bytes, except source.json (it names where the manifest was read from)
    assert set(local) == set(remote)
    assert {k for k in local if local[k] != remote[k]} == {"source.json"}
    assert json.loads(remote["source.json"])["manifest"].startswith("s3://lumo/in/manifest.jsonl?")
    assert not any(k.endswith(".tmp") for k in remote)
    capsys.readouterr()
    assert main(["data", "tokenize", "--manifest", str(data["dir"] / "manifest.jsonl"), "--out", data["uri"],
                 *sets(DATA)]) == 0
    assert f"({n} complete, 0 to write)" in capsys.readouterr().out
    assert without_source(tree(data["uri"])) == without_source(remote)


def test_interrupted_s3_run_resumes_to_identical_bytes(data, s3, capsys):
    """No rename on S3: what a crash can leave is a stale .tmp object, a key whose bytes are not
    what its stats recorded, and no index.json. The re-run redoes exactly the bad shard."""
    remote = tree(data["uri"])
    root = locate(s3("resume"))
    for name, b in remote.items():
        (root / name).write_bytes(b)
    tars = sorted(k for k in remote if k.endswith(".tar"))
    (root / "index.json").unlink()
    (root / (tars[0] + ".tmp")).write_bytes(remote[tars[0]][:700])
    (root / tars[1]).write_bytes(remote[tars[1]][:1000])
    capsys.readouterr()
    assert main(["data", "tokenize", "--manifest", s3("in/manifest.jsonl"), "--out", str(root), *sets(DATA)]) == 0
    assert f"({len(tars) - 1} complete, 1 to write)" in capsys.readouterr().out
    assert without_source(tree(root)) == without_source(remote) and not any(k.endswith(".tmp") for k in tree(root))


def test_normalize_to_s3_writes_the_local_bytes(data, s3):
    """`lumo data normalize --out s3://...`: manifest, errors, summary and config byte-identical to
    the local run of the fixture (media stay where they are: the manifest names them by absolute path)."""
    d = data["dir"]
    out = s3("norm/audiocaps")
    assert main(["data", "normalize", "--source", "audiocaps", "--input", str(d / "synth" / "audiocaps"),
                 "--out", out, *sets(DATA)]) == 0
    remote, local = tree(out), tree(d / "norm_audiocaps")
    assert set(remote) == set(local) >= {"manifest.jsonl", "errors.jsonl", "summary.json", "config.yaml"}
    assert all(remote[k] == local[k] for k in local), [k for k in local if remote[k] != local[k]]
    recs, errs = read_manifest(str(locate(out) / "manifest.jsonl"))
    assert len(recs) == 8 and not errs and all(os.path.isabs(r.media_path("audio")) for r in recs)


def test_reader_reads_s3_shards_like_local(data):
    for split in ("train", "eval"):
        a = list(ShardDataset(data["local"], split, seed=3, rank=0, world_size=2))
        b = list(ShardDataset(data["uri"], split, seed=3, rank=0, world_size=2))
        assert [s["json"]["id"] for s in a] == [s["json"]["id"] for s in b] and a
        assert all((x["text"] == y["text"]).all() for x, y in zip(a, b))


def test_verify_on_s3_passes_then_fails_on_corrupted_shard(data, s3):
    assert main(["data", "verify", "--shards", data["uri"], "--out", s3("verify/good"), *sets(DATA)]) == 0
    rep = json.loads(locate(s3("verify/good/report.json")).read_text())
    assert rep["pass"] and rep["records"] == load_index(data["uri"])["totals"]["samples"]
    # flip one byte of one shard on the object store: verify must fail and name that shard
    bad = s3("bad_shards")
    for name, b in tree(data["uri"]).items():
        (locate(bad) / name).write_bytes(b)
    entry = load_index(bad)["shards"][1]
    tar = locate(bad) / entry["name"]
    b = bytearray(tar.read_bytes())
    b[600] ^= 0xFF
    tar.write_bytes(bytes(b))
    assert main(["data", "verify", "--shards", bad, "--out", s3("verify/bad"), *sets(DATA)]) == 1
    rep = json.loads(locate(s3("verify/bad/report.json")).read_text())
    probs = rep["checks"]["records"]["problems"]
    assert not rep["checks"]["records"]["pass"]
    assert any(entry["name"] in p and "sha256" in p for p in probs), probs


def test_token_lm_trains_on_s3_checkpoints_to_s3_and_resumes(data, s3, tmp_path):
    store = s3("train/run1")
    base = ["train", "token-lm", "--shards", data["uri"], *sets(LM + [f"token_lm.train.storage_path={store}"])]
    assert main(base + ["--out", str(tmp_path / "a"), "--set", "token_lm.train.steps=2"]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert a["steps"] == 2 and len(a["loss_history"]) == 2
    metas = lambda: sorted(json.loads(p.read_text())["step"] for p in locate(store).glob("token_lm/*/meta.json"))
    assert metas() == [2]  # the reported checkpoint went to the object store
    assert locate(store).glob("token_lm/*/state.pt")
    # A fresh run directory (nothing local) on the same storage_path: Ray Train restores step 2 from s3.
    assert main(base + ["--out", str(tmp_path / "b"), "--set", "token_lm.train.steps=4"]) == 0
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["steps"] == 4 and len(b["loss_history"]) == 2  # only steps 3 and 4 ran
    assert not (tmp_path / "b" / "checkpoints" / "step-0000002").exists()
    assert metas() == [2, 4]
    # The object store holds run a's step-2 checkpoint byte for byte, and resuming in-process from its
    # URI (train.resume=s3://...) gives the losses of run b, which Ray Train restored from there.
    ck = next(p.parent for p in locate(store).glob("token_lm/*/meta.json") if json.loads(p.read_text())["step"] == 2)
    local_ck = tmp_path / "a" / "checkpoints" / "step-0000002"
    assert all(p.read_bytes() == (ck / p.name).read_bytes() for p in local_ck.iterdir())
    assert {p.name for p in local_ck.iterdir()} >= {"state.pt", "meta.json", "token_space.json"}
    cfg = load_config(LumoConfig, None, LM + [f"token_lm.shards={data['uri']}", "token_lm.train.steps=4",
                                              f"token_lm.out={tmp_path / 'ref'}", f"token_lm.train.resume={ck}"])
    ref = token_lm_loop(cfg, LocalContext(), log=lambda *a, **k: None)
    assert len(ref["loss_history"]) == 2
    assert all(abs(x - y) <= 1e-5 for x, y in zip(ref["loss_history"], b["loss_history"])), \
        (ref["loss_history"], b["loss_history"])
    st = load_state(tmp_path / "b" / "checkpoints" / "step-0000004")
    assert st["step"] == 4 and st["token_space_hash"] == load_index(data["uri"])["token_space_hash"]


def test_uri_manifest_needs_absolute_media(s3, tmp_path):
    rec = {"id": "x:1", "source": "x", "group": "g", "task": "i2t", "text": {"prompt": "", "caption": "c"}}
    lines = [dict(rec, modalities={"image": {"path": "img/1.png"}}),
             dict(rec, id="x:2", modalities={"image": {"path": "/data/img/2.png"}})]
    m = locate(s3("edge/manifest.jsonl"))
    m.write_text("".join(json.dumps(d) + "\n" for d in lines))
    recs, errs = read_manifest(str(m))
    assert [r.id for r in recs] == ["x:2"] and recs[0].media_path("image") == "/data/img/2.png"
    assert [(e.id, e.reason) for e in errs] == [("x:1", "relative media path")] and "line 1" in errs[0].detail
    assert read_manifest(str(m), root=tmp_path)[0][0].media_path("image") == str(tmp_path / "img" / "1.png")


def test_run_directories_on_s3_train_evaluate_and_generate(data, s3):
    """Run directories may be URIs: the base LM and the token LM (warm-started from the base LM's
    export on s3) write config.yaml, metrics.json and export/ there, checkpoints go through Ray Train
    storage under <out>/ray; the evals and generation read the run from s3 and write their reports
    there; the local staging copies are removed."""
    lm, tlm = locate(s3("runs/lm")), locate(s3("runs/tlm"))
    rc = main(["train", "lm", "--input", str(TINY_CORPUS), "--out", str(lm), *sets([
        "lm.train.steps=4", "lm.train.eval_every=2", "lm.train.ckpt_every=2", "lm.train.log_every=1000",
        "lm.seq_len=32", "lm.train.global_batch=4", "lm.eval_fraction=0.2", "lm.train.cpus_per_worker=0.5"])])
    assert rc == 0
    m = json.loads((lm / "metrics.json").read_text())
    assert m["steps"] == 4 and m["export"] == str(lm / "export")
    assert (lm / "config.yaml").exists() and (lm / "export" / "config.json").exists()
    assert lm.glob("ray/lm/checkpoint_*/state.pt") and not lm.glob("checkpoints/*")
    rc = main(["train", "token-lm", "--shards", data["uri"], "--base", str(lm / "export"), "--out", str(tlm),
               *sets(LM + ["token_lm.train.steps=2"])])
    assert rc == 0
    t = json.loads((tlm / "metrics.json").read_text())
    assert t["steps"] == 2 and t["export"] == str(tlm / "export") and (tlm / "export" / "token_space.json").exists()
    assert tlm.glob("ray/token_lm/checkpoint_*/state.pt") and not tlm.glob("checkpoints/*")
    assert load_config(LumoConfig, None, []).token_lm.base != str(lm / "export")  # the URI came from --base

    inv = locate(s3("reports/inv"))
    assert main(["eval", "text-invariance", "--run", str(tlm), "--base", str(lm / "export"), "--out", str(inv)]) == 0
    rep = json.loads((inv / "report.json").read_text())
    assert rep["pass"] and rep["max_abs_logit_diff"] == 0 and rep["run"] == str(tlm)
    abl = locate(s3("reports/abl"))
    rc = main(["eval", "modality-ablation", "--run", str(tlm), "--out", str(abl)])
    rep = json.loads((abl / "report.json").read_text())
    assert rc == (0 if rep["pass"] else 1) and rep["run"] == str(tlm) and (abl / "report.md").exists()
    gen = locate(s3("gen"))
    rc = main(["generate", "--run", str(tlm), "--task", "t2a", "--prompt", "three short high beeps",
               "--out", str(gen), "--audio-frames", "4"])
    rows = [json.loads(x) for x in (gen / "generations.jsonl").read_text().splitlines()]
    assert rc == 0 and len(rows) == 1 and rows[0]["ok"] and gen.glob("*.wav")

    staged = {hashlib.sha256(str(x).encode()).hexdigest()[:16] for x in (lm, tlm, inv, abl, gen)}
    assert runs_root().is_dir()  # the read cache of --run / --base is there
    left = [d.name for d in runs_root().glob("*-*") if d.name.split("-")[0] in staged]
    assert left == []


def test_run_dir_mirror_uploads_changes_and_leaves_checkpoints_to_ray(s3):
    from lumo_ray.storage import RunDir, fetch_run, runs_root
    assert runs_root().name == f"lumo-runs-{os.getuid()}"
    run = RunDir(s3("mirror/run"))
    assert run.remote and run.local.is_dir() and str(os.getpid()) in run.local.name
    from trainers.checkpoint import CHECKPOINTS

    for rel in ("metrics.json", "export/model.bin", f"{CHECKPOINTS}/step-1/state.pt", "ray/train/x", "index.json.tmp"):
        (run.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.local / rel).write_text(rel)
    run.push()
    assert sorted(p.path[len(run.loc.path) + 1:] for p in run.loc.glob("*")) == ["export/model.bin", "metrics.json"]
    (run.local / "metrics.json").write_text("changed")
    (run.local / "export" / "model.bin").write_text("EXPORT/MODEL.BIN")  # same size: the mtime tells
    os.utime(run.local / "export" / "model.bin", ns=(1, 1))
    run.push()
    assert (run.loc / "metrics.json").read_text() == "changed"
    assert (run.loc / "export" / "model.bin").read_text() == "EXPORT/MODEL.BIN"
    got = fetch_run(str(run.loc)) / "export"
    assert got.name == "export" and (got / "model.bin").read_text() == "EXPORT/MODEL.BIN"
    assert not list(got.parent.rglob("*.part")) and not (got.parent / "checkpoints").exists()
    # the cache follows the URI: unchanged files are not downloaded again, removed ones disappear
    os.utime(got / "model.bin", ns=(5, 5))
    (run.loc / "export" / "model.bin").unlink()
    (run.loc / "export" / "shard-1.bin").write_text("new")
    again = fetch_run(str(run.loc)) / "export"
    assert again == got and sorted(p.name for p in again.iterdir()) == ["shard-1.bin"]
    (run.loc / "export" / "shard-2.bin").write_text("two")
    os.utime(again / "shard-1.bin", ns=(5, 5))
    fetch_run(str(run.loc))
    assert (again / "shard-1.bin").stat().st_mtime_ns == 5 and (again / "shard-2.bin").read_text() == "two"
    # a recycled pid's leftovers are not uploaded with the next run
    (run.local / "stale.wav").write_text("old")
    assert not (RunDir(str(run.loc)).local / "stale.wav").exists()
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        fetch_run(s3("mirror/missing"))


def test_raw_dataset_and_media_on_s3_normalize_tokenize_and_verify(data, s3):
    """The raw datasets (LLaVA JSON, AudioCaps CSV) and their media uploaded to s3: normalize reads the
    metadata and probes the media there (manifests name s3:// media), tokenize's workers read the
    media from s3 (tars and index are the local run's bytes) and verify passes."""
    synth = data["dir"] / "synth"
    for f in sorted(synth.rglob("*")):
        if f.is_file():
            locate(s3(f"raw/{f.relative_to(synth)}")).write_bytes(f.read_bytes())
    recs = []
    for src in ("llava_pretrain", "audiocaps"):
        out = s3(f"raw_norm/{src}")
        assert main(["data", "normalize", "--source", src, "--input", s3(f"raw/{src}"), "--out", out, *sets(DATA)]) == 0
        recs += read_manifest(str(locate(out) / "manifest.jsonl"))[0]
    assert len(recs) == 16 and all(r.media_path(m).startswith("s3://lumo/raw/") for r in recs for m in r.modalities)
    manifest = str(write_manifest(recs, s3("raw_norm/manifest.jsonl")))
    out = s3("raw_shards")
    assert main(["data", "tokenize", "--manifest", manifest, "--out", out, *sets(DATA)]) == 0
    local, remote = tree(data["local"]), tree(out)
    assert {k: v for k, v in remote.items() if k.endswith(".tar") or k == "index.json"} == \
        {k: v for k, v in local.items() if k.endswith(".tar") or k == "index.json"}
    assert main(["data", "verify", "--shards", out, "--out", s3("raw_verify"), *sets(DATA)]) == 0
