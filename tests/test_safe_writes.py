"""Writes stay inside the output folder, and inputs are bounded per record (issue 33).

Real LLaVA records (tests/conftest.py `real_data`) go through normalize -> tokenize -> verify ->
a 2-step tiny token LM, with a symlink planted at each output name of every stage (and at the temp
names the writers use): no target outside the folder changes, each name ends up a regular file. The
same input carries the bad records one at a time: a 10 MB caption, a NUL byte in an id, a symlink-loop
image and a caption that fits normalize's character bound but not the token LM's max_len. Each one
is one error row and the rest trains.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data import shard_set
from lumo_ray.data.manifest import read_errors, read_manifest
from lumo_ray.data.shards import iter_tar, load_index
from lumo_ray.errors import is_user_error, one_line
from lumo_ray.storage import UnsafeOutput, locate, staged_dir, write_file
from lumo_ray.uti import load_token_space
from pipelines.normalize import run_normalize
from pipelines.tokenize import run_tokenize
from pipelines.verify import run_verify
from trainers.context import LocalContext
from trainers.token_lm import token_lm_loop

PRECIOUS = "precious: must not change\n"
SETTINGS = ["uti.audio.kind=none", "data.normalize.eval_permille=200", "data.tokenize.shard_size=16",
            "data.tokenize.batch_size=8", "data.verify.retokenize_n=4", "data.verify.decode_spot_checks=1",
            "token_lm.train.steps=2", "token_lm.train.global_batch=2", "token_lm.train.warmup_steps=1",
            "token_lm.train.eval_every=2", "token_lm.train.ckpt_every=2", "token_lm.seq.max_len=256"]
TEN_MB = 10 * 1024 * 1024
N_REAL = 12
NORMALIZE_OUT = ["manifest.jsonl", "errors.jsonl", "summary.json", "config.yaml", "manifest.jsonl.tmp",
                 "errors.jsonl.tmp", "summary.json.tmp"]
TOKENIZE_OUT = ["config.yaml", "source.json", "token_space.json", "token_space.sha256", "errors.jsonl",
                "summary.json", "index.json", "index.json.tmp", "train/shard-000000.tar", "train/shard-000000.tar.tmp",
                "train/shard-000000.stats.json", "eval/shard-000000.tar", "eval/shard-000000.stats.json"]
VERIFY_OUT = ["report.json", "baseline.json", "config.yaml", "report.json.tmp"]
TRAIN_OUT = ["config.yaml", "metrics.json", "metrics.json.tmp", "export/model.safetensors", "export/config.json",
             "export/token_space.json", "export/lumo_token_lm.json"]


def plant(out: Path, names: list[str], outside: Path) -> dict[Path, Path]:
    """A symlink at each output name, pointing at a file outside the folder: {link: target}."""
    links = {}
    for name in names:
        target = outside / f"{out.name}__{name.replace('/', '__')}"
        target.write_text(PRECIOUS)
        link = out / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
        links[link] = target
    return links


def assert_not_followed(links: dict[Path, Path]) -> None:
    """Each target unchanged; each output name now the output itself, each temp name gone."""
    for link, target in links.items():
        assert target.read_text() == PRECIOUS, f"{target} was written through {link}"
        if link.name.endswith(".tmp"):
            assert not link.is_symlink() and not link.exists(), f"{link} (a temp name) should be gone"
        else:
            assert link.is_file() and not link.is_symlink(), f"{link} should now be the output itself"


def bad_llava(real: Path, dst: Path) -> Path:
    """The first N_REAL records of the real LLaVA sample plus four bad records: a 10 MB caption, a NUL
    byte in an id, a symlink-loop image, a caption under 4,096 characters that is far over 256 tokens."""
    shutil.copytree(real / "llava_pretrain", dst)
    meta = dst / "blip_laion_cc_sbu_sample.json"
    rows = json.loads(meta.read_text())[:N_REAL]  # enough to train on, quick to probe and tokenize
    first = rows[0]

    def row(i: str, image: str, caption: str) -> dict:
        return {"id": i, "image": image, "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                                          {"from": "gpt", "value": caption}]}
    (dst / "images" / "loop.png").symlink_to("loop.png")
    rows += [row("huge", first["image"], "a very long caption " + "x" * TEN_MB),
             row("nul\x00id", first["image"], "a caption with a bad id"),
             row("looped", "images/loop.png", "a picture of a loop"),
             row("wordy", first["image"], " ".join(f"q{k}z" for k in range(700)))]
    meta.write_text(json.dumps(rows))
    return dst


@pytest.fixture(scope="module")
def run(real_data, ray_local, tmp_path_factory):
    """Every stage once, each into a folder with symlinks planted at its output names."""
    root = tmp_path_factory.mktemp("safe")
    outside = root / "outside"
    outside.mkdir()
    cfg = load_config(LumoConfig, None, SETTINGS)
    src = bad_llava(real_data, root / "llava")
    links = {}
    for stage, names in (("norm", NORMALIZE_OUT), ("shards", TOKENIZE_OUT), ("verify", VERIFY_OUT),
                         ("train", TRAIN_OUT)):
        (root / stage).mkdir()
        links[stage] = plant(root / stage, names, outside)
    summary = run_normalize("llava_pretrain", src, root / "norm", cfg.data.normalize)
    tok = run_tokenize(root / "norm" / "manifest.jsonl", cfg, root / "shards", actors=1, log=lambda *a, **k: None)
    rep = run_verify(root / "shards", cfg, root / "verify", write_baseline=True, log=lambda *a, **k: None)
    tcfg = load_config(LumoConfig, None, SETTINGS + [f"token_lm.shards={root / 'shards'}",
                                                      f"token_lm.out={root / 'train'}"])
    metrics = token_lm_loop(tcfg, LocalContext(), ts=load_token_space(cfg.uti), log=lambda *a, **k: None)
    return {"root": root, "outside": outside, "links": links, "normalize": summary, "tokenize": tok,
            "verify": rep, "metrics": metrics}


def test_normalize_records_each_bad_record_and_goes_on(run):
    root, s = run["root"], run["normalize"]
    errs = {e.id: e for e in read_errors(root / "norm" / "errors.jsonl")}
    assert errs["llava_pretrain:huge"].reason == "caption too long" and errs["llava_pretrain:huge"].stage == "bounds"
    assert f"{TEN_MB + 20} characters > data.normalize.max_caption_chars 4096" in errs["llava_pretrain:huge"].detail
    assert errs["llava_pretrain:nul\\x00id"].reason == "id not printable"  # the id shown escaped, one line
    assert errs["llava_pretrain:looped"].reason == "unreadable file"
    assert "Too many levels of symbolic links" in errs["llava_pretrain:looped"].detail
    assert set(errs) == {"llava_pretrain:huge", "llava_pretrain:nul\\x00id", "llava_pretrain:looped"}
    recs, _ = read_manifest(root / "norm" / "manifest.jsonl")
    assert len(recs) == s["ok"] == N_REAL + 1 and s["errors"] == 3  # the real records and 'wordy'
    assert all("\x00" not in r.id for r in recs)
    assert (root / "norm" / "errors.jsonl").stat().st_size < 10_000  # the 10 MB caption is not copied along
    assert_not_followed(run["links"]["norm"])


def test_tokenize_bounds_text_tokens_and_follows_no_symlink(run):
    root, s = run["root"], run["tokenize"]
    errs = {e.id: e for e in read_errors(root / "shards" / "errors.jsonl")}
    assert list(errs) == ["llava_pretrain:wordy"] and errs["llava_pretrain:wordy"].reason == "text too long"
    assert "> data.tokenize.max_text_tokens 256" in errs["llava_pretrain:wordy"].detail
    assert s["samples"] == N_REAL
    index = load_index(root / "shards")
    longest = max(len(smp.get("text", [])) + len(smp.get("prompt", []))
                  for sh in index["shards"] for smp in iter_tar(root / "shards" / sh["name"]))
    assert 0 < longest <= 256
    assert_not_followed(run["links"]["shards"])


def test_verify_follows_no_symlink(run):
    assert run["verify"]["pass"], run["verify"]["checks"]
    assert_not_followed(run["links"]["verify"])


def test_training_proceeds_on_the_rest_and_follows_no_symlink(run):
    m, root = run["metrics"], run["root"]
    assert m["steps"] == 2 and m["eval_loss"] == m["eval_loss"]  # not NaN: trained on the good samples
    assert json.loads((root / "train" / "metrics.json").read_text())["steps"] == 2
    assert_not_followed(run["links"]["train"])
    assert sorted(p.name for p in run["outside"].iterdir() if not p.name.startswith(("norm__", "shards__", "verify__",
                                                                                        "train__"))) == []


def test_a_symlinked_subfolder_is_refused_with_one_line(run, tmp_path):
    out, away = tmp_path / "out", tmp_path / "away"
    out.mkdir()
    away.mkdir()
    (out / "train").symlink_to(away)
    with pytest.raises(UnsafeOutput, match="outside the output folder"):  # tokenize: on the driver, before a worker
        run_tokenize(run["root"] / "norm" / "manifest.jsonl", load_config(LumoConfig, None, SETTINGS), out,
                     log=lambda *a, **k: None)
    with pytest.raises(UnsafeOutput) as e:  # the tokenize writer of one shard (a symlink planted after that check)
        shard_set.write_shard(locate(out), ("train", 0), [], {}, "digest")
    msg = one_line(e.value)
    assert is_user_error(e.value) and "\n" not in str(e.value)
    assert "outside the output folder" in msg and str(out / "train" / "shard-000000.tar") in msg
    with pytest.raises(UnsafeOutput):  # a trainer's export folder planted as a symlink
        with staged_dir(out / "train") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UnsafeOutput):
        write_file(out / "train" / "metrics.json", "{}", root=out)
    assert list(away.iterdir()) == []
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # and no temp file left behind
