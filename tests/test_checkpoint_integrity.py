"""Checkpoints prove themselves (docs/cluster.md, "Checkpoint integrity"): a flipped byte in any file of a
DDP or sharded FSDP checkpoint is refused at resume with one line naming the file (exit 2 from `lumo`);
train.resume=auto skips what does not verify, says so, and refuses rather than starting over; a pickle
payload in state.pt with a correct digest is not executed. Tiny base LM, 2 steps, in one process except
the CLI runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lumo_ray.codecs.text import TINY_CORPUS
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.integrity import MANIFEST, IntegrityError, write_manifest
from trainers.checkpoint import resolve_resume
from trainers.context import LocalContext
from trainers.lm import lm_loop

LM = ["lm.train.steps=2", "lm.train.eval_every=2", "lm.train.ckpt_every=1", "lm.train.log_every=1000",
      "lm.seq_len=32", "lm.train.global_batch=8", "lm.eval_fraction=0.2", "lm.train.cpus_per_worker=0.5"]
STEP1, STEP2 = "checkpoints/step-0000001", "checkpoints/step-0000002"


def lm_cfg(out: Path, *extra: str) -> LumoConfig:
    cfg = load_config(LumoConfig, None, [*LM, f"lm.out={out}", *extra])
    cfg.lm.inputs = [str(TINY_CORPUS)]
    return cfg


def train(out: Path, *extra: str, log=lambda *a, **k: None) -> dict:
    try:
        return lm_loop(lm_cfg(out, *extra), LocalContext(), log=log)
    finally:
        if torch.distributed.is_initialized():  # fsdp in one process opened a gloo group of one
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """A 2-step run per strategy with a checkpoint after each step."""
    root = tmp_path_factory.mktemp("ckpt_runs")
    return {s: (root / s, train(root / s, f"lm.train.strategy={s}")) for s in ("ddp", "fsdp")}


def flip(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("export", "tensorboard", "metrics.json"))
    return dst


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_flipped_byte_in_any_checkpoint_file_is_refused_naming_it(runs, strategy, tmp_path):
    src = runs[strategy][0] / STEP2
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    want = {"SHA256SUMS", "meta.json", "state.json", "state.pt"} | (
        {"shards/.metadata", "shards/__0_0.distcp"} if strategy == "fsdp" else set())
    assert set(files) == want
    ctx = LocalContext()
    assert resolve_resume(str(src), tmp_path, ctx) == src  # the untouched checkpoint verifies
    for i, rel in enumerate(files):
        ck = shutil.copytree(src, tmp_path / f"c{i}")
        flip(ck / rel)
        with pytest.raises(IntegrityError) as e:
            resolve_resume(str(ck), tmp_path, ctx)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1, msg
        # a changed manifest is named as the side of the comparison that changed
        assert (MANIFEST in msg) if rel == MANIFEST else (f"({ck / rel})" in msg and "does not match SHA256SUMS" in msg), msg
    old = shutil.copytree(src, tmp_path / "old")  # written before digests: refused, not loaded
    (old / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=f"checkpoint \\({old}\\): no SHA256SUMS"):
        resolve_resume(str(old), tmp_path, ctx)


def lumo_train_lm(out: Path, capsys, *sets: str) -> tuple[int, str]:
    from lumo_ray.cli import main

    capsys.readouterr()
    rc = main(["train", "lm", "--input", str(TINY_CORPUS), "--out", str(out),
               *[x for s in (*LM, *sets) for x in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    if rc == 2:
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return rc, err


@pytest.mark.parametrize("strategy,rel", [("ddp", "state.pt"), ("fsdp", "shards/__0_0.distcp")])
def test_lumo_train_refuses_a_flipped_byte_with_one_line_and_exit_2(runs, strategy, rel, tmp_path, capsys):
    """The probe of issue 33: one flipped byte in the weights of the checkpoint `lumo train lm` is told to
    resume: exit 2, one line naming the file, refused before Ray starts, nothing trained."""
    ck = shutil.copytree(runs[strategy][0] / STEP2, tmp_path / "ck")
    flip(ck / rel)
    out = tmp_path / "run"
    rc, err = lumo_train_lm(out, capsys, "lm.train.steps=3", f"lm.train.strategy={strategy}", f"lm.train.resume={ck}")
    assert rc == 2 and f"({ck / rel})" in err and "does not match SHA256SUMS" in err, err
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def test_a_flipped_byte_in_the_checkpoint_ray_restores_is_refused_in_the_worker(tmp_path, capsys, ray_local):
    """The same run launched again on its Ray storage: Ray Train hands the workers its copy of the newest
    checkpoint, which has a flipped byte; the worker refuses it (exit 2, one line) instead of training."""
    out = tmp_path / "run"
    assert lumo_train_lm(out, capsys)[0] == 0
    ray_ck = next(p.parent for p in (out / "ray" / "lm").glob("checkpoint_*/meta.json")
                  if json.loads(p.read_text())["step"] == 2)
    flip(ray_ck / "state.pt")
    rc, err = lumo_train_lm(out, capsys, "lm.train.steps=3")
    assert rc == 2 and "state.pt): sha256" in err and "does not match SHA256SUMS" in err, err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2  # the first run's: nothing trained since


def test_resume_auto_falls_back_to_the_last_valid_checkpoint_and_refuses_when_none(runs, tmp_path):
    run, straight = runs["ddp"]
    a = copy_run(run, tmp_path / "a")
    flip(a / STEP2 / "state.pt")
    said: list[str] = []
    m = train(a, "lm.train.resume=auto", log=said.append)
    skipped = [s for s in said if s.startswith("train.resume=auto: skipped")]
    assert len(skipped) == 1 and str(a / STEP2) in skipped[0] and "state.pt" in skipped[0] \
        and "does not match SHA256SUMS" in skipped[0], said
    assert any(s == f"train.resume=auto: resuming {a / STEP1}, the newest checkpoint that verifies" for s in said), said
    # resumed exactly at step 1 (not started over): step 2's loss is the straight run's
    assert len(m["loss_history"]) == 1 and abs(m["loss_history"][0] - straight["loss_history"][1]) <= 1e-6
    assert resolve_resume("auto", a, LocalContext()) == a / STEP2  # rewritten by the resumed run: valid again

    b = copy_run(run, tmp_path / "b")
    flip(b / STEP1 / "state.json")
    (b / STEP2 / MANIFEST).unlink()
    said.clear()
    with pytest.raises(IntegrityError) as e:
        train(b, "lm.train.resume=auto", log=said.append)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "none of 2 checkpoints verifies (step-0000002, step-0000001" in msg, msg
    assert [s.split(":")[1].strip() for s in said if "skipped" in s] == ["skipped " + str(b / STEP2),
                                                                          "skipped " + str(b / STEP1)], said
    assert not (b / "metrics.json").exists() and sorted(p.name for p in (b / "checkpoints").iterdir()) == [
        "step-0000001", "step-0000002"]  # nothing trained, nothing written


def test_a_pickle_payload_in_state_pt_is_not_executed(runs, tmp_path):
    """A crafted state.pt (from a shared bucket, say) whose unpickling would write a file, with a correct
    SHA256SUMS, so that the digest is not what stops it: the resume refuses it and the file is not written."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    ck = shutil.copytree(runs["ddp"][0] / STEP2, tmp_path / "ck")
    torch.save({"model": Payload()}, ck / "state.pt")
    write_manifest(ck)
    with pytest.raises(IntegrityError) as e:
        train(tmp_path / "run", f"lm.train.resume={ck}")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"({ck / 'state.pt'}): not a plain tensor file" in msg and "exec" in msg, msg
    assert not marker.exists()
    torch.load(ck / "state.pt", weights_only=False)  # the payload is live: what a pickle load would have done
    assert marker.read_text() == "ran"


def test_non_tensor_state_is_json(runs):
    ck = runs["ddp"][0] / STEP2
    st = json.loads((ck / "state.json").read_text())
    assert st["step"] == 2 and set(st["rng"]) == {"torch", "numpy", "python", "cuda"} and "data" in st
    assert set(torch.load(ck / "state.pt", weights_only=True)) == {"model", "optimizer"}


def test_exports_and_shipped_presets_are_verified_when_loaded(runs, tmp_path):
    from lumo_ray.codecs import base
    from lumo_ray.codecs.clip import ASSET_DIR
    from lumo_ray.integrity import verify
    from lumo_ray.models.token_lm import load_causal_lm, load_token_lm

    export = runs["ddp"][0] / "export"
    assert (export / MANIFEST).is_file()
    load_causal_lm(str(export), 512)  # a base-LM export of `lumo train lm` verifies and loads
    bad = shutil.copytree(export, tmp_path / "bad")
    flip(bad / "model.safetensors")
    with pytest.raises(IntegrityError, match=f"base LM export file \\({bad / 'model.safetensors'}\\): sha256"):
        load_causal_lm(str(bad), 512)
    # a file planted beside a token-LM export's (a pickled model.bin, a swapped token space) is refused
    planted = shutil.copytree(export, tmp_path / "planted")
    (planted / "token_space.json").write_text("{}")
    with pytest.raises(IntegrityError, match="token-LM export file .*token_space.json.*not listed in SHA256SUMS"):
        load_token_lm(planted)
    for preset in (base.TINY_VQ_WEIGHTS.parent, ASSET_DIR):  # the shipped presets carry their digests
        verify(preset)
        copy = shutil.copytree(preset, tmp_path / preset.name)
        flip(copy / "model.safetensors")
        with pytest.raises(IntegrityError, match="model.safetensors.*does not match SHA256SUMS"):
            verify(copy, "shipped preset")
