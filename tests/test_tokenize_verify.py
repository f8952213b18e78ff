"""Tokenize (Ray Data actor pool -> deterministic shards, resume, errors) and the data verify gate."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.manifest import read_manifest, write_manifest
from lumo_ray.data.shard_reader import ShardDataset, rank_order
from lumo_ray.data.shards import iter_tar, load_index, npy_bytes, write_tar
from lumo_ray.data.synth import write_synth
from lumo_ray.token_space import TokenSpaceMismatch
from lumo_ray.uti import load_token_space
from pipelines.normalize import run_normalize
from pipelines.tokenize import run_tokenize
from pipelines.verify import run_verify

CFG = ["data.tokenize.shard_size=6", "data.tokenize.batch_size=4", "data.verify.decode_spot_checks=2"]


def cfg(*extra):
    return load_config(LumoConfig, None, CFG + list(extra))


def quiet(*a, **k):
    pass


def tree_bytes(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and (p.suffix == ".tar" or p.name == "index.json")}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, ray_local):
    """Synthetic images + audio, normalized, concatenated into one manifest."""
    d = tmp_path_factory.mktemp("tok")
    write_synth(d / "synth", 10, 10, seed=3)
    recs = []
    for src, sub in (("llava_pretrain", "llava_pretrain"), ("audiocaps", "audiocaps")):
        run_normalize(src, d / "synth" / sub, d / f"norm_{src}", cfg().data.normalize)
        recs += read_manifest(d / f"norm_{src}" / "manifest.jsonl")[0]
    write_manifest(recs, d / "manifest.jsonl")
    return d / "manifest.jsonl"


@pytest.fixture(scope="module")
def shards(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards1")
    run_tokenize(manifest, cfg(), out, actors=1, log=quiet)
    return out


@pytest.fixture(scope="module")
def shards_b1(manifest, tmp_path_factory):
    """The reference of the runs with model batches of 1 (an uninterrupted run, one actor)."""
    out = tmp_path_factory.mktemp("shards_b1")
    run_tokenize(manifest, cfg("data.tokenize.batch_size=1"), out, actors=1, log=quiet)
    return out


def test_shards_layout_and_content(shards, manifest):
    index = load_index(shards)
    ts = load_token_space(cfg().uti)
    assert index["token_space_hash"] == ts.hash
    assert index["totals"]["samples"] == 20 and sum(s["samples"] for s in index["shards"]) == 20
    assert all(s["name"].split("/")[0] in ("train", "eval") for s in index["shards"])
    tars = sorted(shards.rglob("*.tar"))
    assert len(tars) == index["totals"]["shards"]
    with tarfile.open(tars[0]) as t:
        m = t.getmembers()
        assert all(x.mtime == 0 and x.uid == 0 and x.gid == 0 for x in m)
    s = next(iter_tar(tars[0]))
    assert s["json"]["token_space_hash"] == ts.hash
    assert s["text"].dtype == np.uint16  # the tiny space has 2,880 ids
    if "audio" in s:
        assert ts.audio_phase_errors(s["audio"]) == []


def test_actor_count_does_not_change_bytes_and_rerun_skips(shards, shards_b1, manifest, tmp_path):
    out2 = tmp_path / "shards2"
    lines = []  # the 2 actors each ask for one of the session's 2 fake GPUs: Ray gives them, CUDA is absent
    run_tokenize(manifest, cfg("data.tokenize.num_gpus_per_actor=1"), out2, actors=2, log=lines.append)
    placed = next(x for x in lines if x.startswith("[tokenize] tokenizer actors computed on: "))
    assert "Ray GPU ids none" not in placed and "cuda" not in placed  # (tests/test_gpu_requests.py: the rest)
    assert tree_bytes(out2) == tree_bytes(shards)
    lines = []
    run_tokenize(manifest, cfg(), out2, actors=2, log=lines.append)
    assert "(" + str(load_index(out2)["totals"]["shards"]) + " complete, 0 to write)" in lines[0]
    assert tree_bytes(out2) == tree_bytes(shards)
    # Another model batch size can change codes (batched encodes are not bitwise batch-invariant):
    # no finished shard is kept, and the bytes are those of a fresh run with that batch size.
    lines.clear()
    run_tokenize(manifest, cfg("data.tokenize.batch_size=1"), out2, actors=2, log=lines.append)
    n = load_index(out2)["totals"]["shards"]
    assert f"(0 complete, {n} to write)" in lines[0]
    assert tree_bytes(out2) == tree_bytes(shards_b1)


def test_interrupted_run_resumes_to_identical_output(shards, manifest, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(shards, out)
    tars = sorted(out.rglob("*.tar"))
    # An interrupted run leaves: no index, a half-written temp tar, and a shard that never finished.
    (out / "index.json").unlink()
    tars[0].with_name(tars[0].name + ".tmp").write_bytes(tars[0].read_bytes()[:700])
    tars[0].unlink()
    tars[1].write_bytes(tars[1].read_bytes()[:1000])  # truncated (sha256 no longer matches its stats)
    lines = []
    run_tokenize(manifest, cfg(), out, actors=1, log=lines.append)
    n = load_index(out)["totals"]["shards"]
    assert f"({n - 2} complete, 2 to write)" in lines[0]
    assert not list(out.rglob("*.tmp"))
    assert tree_bytes(out) == tree_bytes(shards)


def test_bad_samples_recorded_job_completes(manifest, tmp_path):
    recs = read_manifest(manifest)[0]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    audio = [r for r in recs if r.task == "a2t"]
    image = [r for r in recs if r.task == "i2t"]
    audio[0].modalities["audio"]["path"] = str(bad_dir / "missing.wav")
    raw = Path(audio[1].modalities["audio"]["path"]).read_bytes()
    (bad_dir / "trunc.wav").write_bytes(raw[: len(raw) // 3])
    audio[1].modalities["audio"]["path"] = str(bad_dir / "trunc.wav")
    (bad_dir / "text.png").write_text("this is not an image\n")
    image[0].modalities["image"]["path"] = str(bad_dir / "text.png")
    image[1].text["caption"] = "   "
    m = tmp_path / "m.jsonl"
    write_manifest(recs, m)
    with open(m, "a") as fh:
        fh.write('{"id": "broken", "task": \n')
    out = tmp_path / "shards"
    lines: list[str] = []
    summary = run_tokenize(m, cfg(), out, log=lines.append)
    # under the ceiling the job exits 0, and says so: count, rate, top reasons, where they are
    (warn,) = [s for s in lines if "WARNING" in s]
    assert warn.startswith("[tokenize] WARNING: dropped 5 of 21 records (23.8%): ") and "(1)" in warn
    assert warn.endswith(f"each one is in {out / 'errors.jsonl'}")
    errs = {e["id"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert "not found" in errs[audio[0].id]["reason"] and "missing.wav" in errs[audio[0].id]["detail"]
    assert "trunc.wav" in errs[audio[1].id]["detail"]
    assert "text.png" in errs[image[0].id]["detail"]
    assert errs[image[1].id]["reason"] == "empty caption"
    assert any("line 21" in e["detail"] for e in errs.values())
    assert summary["errors"] == 5 and summary["samples"] == 16
    assert load_index(out)["totals"]["samples"] == 16
    with pytest.raises(RuntimeError, match=r"error rate 23.8% exceeds the ceiling 10.0%; top reasons: .*\(1\)"):
        run_tokenize(m, cfg("data.tokenize.error_rate_ceiling=0.1"), tmp_path / "ceiling", log=quiet)


def test_reader_equal_batches_deterministic_and_hash_refusal(shards):
    counts = [7, 3, 5]
    orders = [rank_order(counts, seed=1, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert len(orders[0]) == len(orders[1]) == 8
    assert set(orders[0]) | set(orders[1]) == {(s, p) for s, n in enumerate(counts) for p in range(n)}
    assert rank_order(counts, 1, 0, 0, 2) == orders[0] and rank_order(counts, 1, 1, 0, 2) != orders[0]
    ds = [ShardDataset(shards, "train", seed=0, rank=r, world_size=3) for r in range(3)]
    got = [[s["json"]["id"] for s in d] for d in ds]
    assert len({len(g) for g in got}) == 1 and len(got[0]) == len(ds[0])
    assert got[0] == [s["json"]["id"] for s in ds[0]]
    other = load_token_space(cfg("uti.audio.bandwidth=3.0").uti)
    with pytest.raises(TokenSpaceMismatch) as e:
        ShardDataset(shards, "train", expected=other)
    assert other.hash in str(e.value) and load_index(shards)["token_space_hash"] in str(e.value)


def test_verify_passes_on_good_shards(shards, tmp_path):
    rep = run_verify(shards, cfg(), tmp_path / "v", write_baseline=True, log=quiet)
    assert rep["pass"], json.dumps(rep["checks"], indent=1)[:3000]
    assert rep["checks"]["retokenize"]["n"] == 20  # all records when fewer than 256
    assert rep["checks"]["records"]["records"] == 20
    stats = rep["length_stats"]
    assert set(stats) == {"a2t", "i2t"} and stats["i2t"]["image"]["p50"] == 64
    assert (tmp_path / "v" / "baseline.json").exists()
    rep2 = run_verify(shards, cfg(), tmp_path / "v2", baseline=str(tmp_path / "v" / "baseline.json"), log=quiet)
    assert rep2["checks"]["drift"]["pass"]


def _rewrite(out: Path, edit) -> None:
    """Re-write the first train shard with `edit(sample_members)` applied and a consistent index."""
    index = load_index(out)
    entry = next(s for s in index["shards"] if s["split"] == "train")
    p = out / entry["name"]
    samples = []
    with tarfile.open(p) as t:
        cur = {}
        for m in t.getmembers():
            key = m.name.partition(".")[0]
            if cur and next(iter(cur)).partition(".")[0] != key:
                samples.append(cur)
                cur = {}
            cur[m.name] = t.extractfile(m).read()
        samples.append(cur)
    edit(samples)
    st = write_tar(p, samples)
    entry.update(sha256=st["sha256"], bytes=st["bytes"])
    (out / "index.json").write_text(json.dumps(index))


def _set_array(samples, field, fn):
    for name in samples[0]:
        if name.endswith(f".{field}.npy"):
            a = np.load(io.BytesIO(samples[0][name]))
            samples[0][name] = npy_bytes(fn(a.copy()))
            return True
    return False


@pytest.mark.parametrize("corruption", ["flipped_byte", "out_of_range", "wrong_hash", "leaked_group"])
def test_verify_fails_on_each_corruption(shards, tmp_path, corruption):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    if corruption == "flipped_byte":
        p = out / load_index(out)["shards"][0]["name"]
        b = bytearray(p.read_bytes())
        b[600] ^= 0xFF
        p.write_bytes(bytes(b))
        expect = "records"
    elif corruption == "out_of_range":
        def edit(samples):
            def bump(a):
                a[0] = 2879 if a[0] < 576 else 5  # an id of another modality
                return a
            assert _set_array(samples, "text", bump)
        _rewrite(out, edit)
        expect = "records"
    elif corruption == "wrong_hash":
        def edit(samples):
            for n in samples[0]:
                if n.endswith(".json"):
                    meta = json.loads(samples[0][n])
                    meta["token_space_hash"] = "0" * 64
                    samples[0][n] = json.dumps(meta).encode()
        _rewrite(out, edit)
        expect = "records"
    else:
        index = load_index(out)
        ev = next(s for s in index["shards"] if s["split"] == "eval")
        gid = next(iter_tar(out / ev["name"]))["json"]["group"]

        def edit(samples):
            for n in samples[0]:
                if n.endswith(".json"):
                    meta = json.loads(samples[0][n])
                    meta["group"] = gid
                    samples[0][n] = json.dumps(meta).encode()
        _rewrite(out, edit)
        expect = "leakage"
    rep = run_verify(out, cfg(), tmp_path / "v", log=quiet)
    assert not rep["pass"]
    assert not rep["checks"][expect]["pass"], rep["checks"][expect]
    if expect == "records":
        assert rep["checks"]["records"]["problems"]


def test_killed_run_restarts_to_identical_output(shards_b1, manifest, tmp_path):
    """SIGKILL a real `lumo data tokenize` once its first shard is on disk; the re-run finishes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "lumo_ray.cli", "data", "tokenize", "--manifest", str(manifest), "--out", str(out)]
    args += [x for c in CFG for x in ("--set", c)] + ["--set", "data.tokenize.batch_size=1"]
    env = dict(os.environ, RAY_ADDRESS="")
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.rglob("*.stats.json")) and p.poll() is None:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "index.json").exists(), "the run finished before it could be killed"
    lines = []
    run_tokenize(manifest, cfg("data.tokenize.batch_size=1"), out, log=lines.append)
    assert " 0 complete" not in lines[0]  # the killed run's finished shards are kept
    assert tree_bytes(out) == tree_bytes(shards_b1)


def test_decode_spot_checks_are_a_seeded_choice_and_ungrouped_records_are_checked():
    from lumo_ray.data.verify import leakage
    from pipelines.verify import spot_check_choice

    results = [{"shard": f"s{k}", "problems": [] if k != 3 else ["s3: unreadable"],
                "ids": [(f"id{k}-{i}", None, "train") for i in range(10)],
                "lengths": [("i2t", {"image": 64, "text": 5}) if i % 2 else ("a2t", {"audio": 300, "text": 4})
                            for i in range(10)]} for k in range(5)]
    a = spot_check_choice(results, 4, seed=0, modalities=["audio", "image"])
    picks = [(s, sid, m) for s, p in a.items() for sid, ms in p.items() for m in ms]
    assert sorted(m for _, _, m in picks) == ["audio"] * 4 + ["image"] * 4
    assert "s3" not in a  # a shard with problems is not decoded
    first = [("s0", f"id0-{i}") for i in range(8)]
    assert {(s, sid) for s, sid, _ in picks} != set(first)  # not simply the first records
    assert spot_check_choice(results, 4, seed=0, modalities=["audio", "image"]) == a
    assert spot_check_choice(results, 4, seed=1, modalities=["audio", "image"]) != a
    # a record without a group is its own group: the same ungrouped record in both splits is reported as a group too
    leak = leakage([("x", None, "train"), ("x", None, "eval"), ("y", "g", "train"), ("z", "g", "eval")])
    assert leak["groups_in_both"] == ["g", "id:x"] and leak["ids_in_both"] == ["x"]


def test_the_streaming_plan_writes_what_the_in_memory_rule_gives(shards, manifest):
    """Shard bytes equal a plain in-process tokenization of plan_shards (the rule the driver applied
    before workers wrote shards): same records per shard, same model batches, same tars."""
    from lumo_ray.data.shards import write_tar
    from lumo_ray.data.tokenize import SampleTokenizer, plan_shards, plan_units

    c = cfg()
    tok = SampleTokenizer(c.uti)
    index = {s["name"]: s for s in load_index(shards)["shards"]}
    plan = plan_shards(read_manifest(manifest)[0], c.data.tokenize.shard_size)
    assert len(plan) == len(index)
    for (split, i), recs in sorted(plan.items()):
        results = [r for u in plan_units(recs, c.data.tokenize.batch_size)
                   for r in tok.tokenize([tok.load(x.to_dict()) for x in u])]
        st = write_tar(shards.parent / "ref.tar", [r["members"] for r in results if "members" in r])
        assert st["sha256"] == index[f"{split}/shard-{i:06d}.tar"]["sha256"]


def test_write_tar_writes_the_bytes_tarfile_writes(tmp_path):
    """write_tar fills tarfile's own USTAR header; its stream must stay tarfile's, byte for byte, over
    sizes around the 512-byte block and the 10240-byte record, long names (a prefix split) and UTF-8."""
    rng = np.random.default_rng(0)
    names = ["a.json", "0123456789abcdef01234567.text.npy", "x" * 100, "d/" * 40 + "y" * 60, "café.npy"]
    sizes = [0, 1, 511, 512, 513, 10240, 20000]
    samples = [{n: rng.bytes(sizes[(i + j) % len(sizes)]) for j, n in enumerate(names[i % 3:][:3])}
               for i in range(len(names) + len(sizes))]
    samples[3]["d/" * 40 + "y" * 60] = b"long"  # only tarfile's own header path can place this name
    for part in (samples, samples[:1], []):
        ref = io.BytesIO()
        with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for members in part:
                for name in sorted(members):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                        len(members[name]), 0, 0o644, 0, 0, "", ""
                    t.addfile(info, io.BytesIO(members[name]))
        st = write_tar(tmp_path / "t.tar", part)
        assert (tmp_path / "t.tar").read_bytes() == ref.getvalue()
        assert st["bytes"] == len(ref.getvalue()) and st["samples"] == len(part)


def _flip_token_byte(tar_path: Path) -> str:
    """Flip the last byte of the first token array in a tar (a payload byte, not a header): returns its member."""
    with tarfile.open(tar_path) as t:
        m = next(m for m in t.getmembers() if m.name.endswith(".text.npy"))
    b = bytearray(tar_path.read_bytes())
    b[m.offset_data + m.size - 1] ^= 0x01
    tar_path.write_bytes(bytes(b))
    return m.name


def test_a_flipped_byte_is_refused_by_the_shard_readers(shards, tmp_path):
    from lumo_ray.errors import UserError

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    entry = next(s for s in load_index(bad)["shards"] if s["split"] == "train")
    _flip_token_byte(bad / entry["name"])
    assert next(iter_tar(bad / entry["name"]))  # still a well-formed tar: only the hash tells
    with pytest.raises(UserError, match=rf"shard \({bad / entry['name']}\): sha256 .* does not match index.json"):
        list(ShardDataset(bad, "train", shuffle=False))
    assert list(ShardDataset(bad, "eval", shuffle=False))  # the other shards still read


def test_a_killed_shard_writer_is_redone_and_the_output_is_unchanged(shards_b1, manifest, tmp_path):
    """SIGKILL the tokenizer actor (the process that writes shards) while it works: Ray Data restarts
    it and retries its shard; no partial shard is visible and the bytes equal an uninterrupted run."""
    import os
    import signal
    import threading
    import time

    import psutil

    out, res, killed = tmp_path / "killed_writer", {}, []

    def run():
        try:
            res["summary"] = run_tokenize(manifest, cfg("data.tokenize.batch_size=1"), out, log=quiet)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            res["error"] = e
    th = threading.Thread(target=run)
    th.start()
    deadline = time.time() + 300
    while time.time() < deadline and th.is_alive() and not killed:
        if list(out.rglob("*.stats.json")):
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "ShardWriter" in " ".join(p.info["cmdline"] or []):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
        time.sleep(0.05)
    th.join(600)
    assert killed, "no shard writer was running once the first shard was written"
    assert "error" not in res, res.get("error")
    assert not list(out.rglob("*.tmp"))
    assert tree_bytes(out) == tree_bytes(shards_b1)
