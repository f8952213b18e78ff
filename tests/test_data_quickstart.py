"""The README's quick start runs as written (synth -> normalize x2 -> tokenize of both manifests -> verify ->
train), and `lumo data tokenize --manifest A B` is the concatenated manifest: the same shard bytes, ids
unique across the manifests (a repeated one: one line, exit 2, nothing written), merged in the order given."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lumo_ray.data.manifest import Record, write_manifest
from lumo_ray.data.manifest_merge import merge_manifests

REPO = Path(__file__).resolve().parents[1]
LUMO = str(Path(sys.executable).parent / "lumo")  # the venv's `lumo`, whatever the README calls it


def quickstart() -> list[str]:
    """The commands of the README's quick-start block, one a line."""
    text = REPO.joinpath("README.md").read_text()
    section = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == ".venv/bin/lumo", command  # the README's commands run from the repository root
    return [LUMO, *words[1:]]


def lumo(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([LUMO, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_the_quick_start_is_synth_normalize_twice_tokenize_verify_train():
    cmds = [shlex.split(c)[1:4] for c in quickstart()]
    assert [c[:2] for c in cmds] == [["data", "synth"], ["data", "normalize"], ["data", "normalize"],
                                     ["data", "tokenize"], ["data", "verify"], ["train", "token-lm"]]
    tok = shlex.split(quickstart()[3])
    i = tok.index("--manifest")
    assert tok[i + 1].endswith("manifest.jsonl") and tok[i + 2].endswith("manifest.jsonl")  # both sets


def test_synth_prints_the_quick_starts_next_commands(tmp_path):
    """synth's last line is the README's two normalize commands, with the paths it was given."""
    synth, norm_audio, norm_images = quickstart()[:3]
    p = subprocess.run(argv(synth), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    strip = lambda c: c.replace(".venv/bin/lumo", "lumo")  # noqa: E731
    assert last == f"next: {strip(norm_audio)} && {strip(norm_images)}"
    for c in (norm_audio, norm_images):  # its --input folders are the ones synth wrote
        words = shlex.split(c)
        assert (tmp_path / words[words.index("--input") + 1]).is_dir()


def _records(prefix: str, ids: list[str], media: Path) -> list[Record]:
    return [Record(id=f"{prefix}:{i}", source=prefix, group=f"{prefix}:{i}", task="i2t",
                   modalities={"image": {"path": str(media / f"{i}.png")}},
                   text={"prompt": "Describe.", "caption": f"caption {i}"}, split="train") for i in ids]


def test_merge_is_the_manifests_lines_in_the_order_given(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_manifest(_records("llava_pretrain", ["x1", "x2"], tmp_path), a)
    write_manifest(_records("audiocaps", ["y1"], tmp_path), b)
    b.write_bytes(b.read_bytes().rstrip(b"\n"))  # a last line without its newline still ends a line
    merge_manifests([a, b], tmp_path / "ab.jsonl")
    merge_manifests([b, a], tmp_path / "ba.jsonl")
    assert (tmp_path / "ab.jsonl").read_bytes() == a.read_bytes() + b.read_bytes() + b"\n"
    assert (tmp_path / "ba.jsonl").read_bytes() == b.read_bytes() + b"\n" + a.read_bytes()
    # a hand-written manifest's relative media paths resolve against its own folder, as when read alone
    sub = tmp_path / "hand"
    sub.mkdir()
    rel = _records("jsonl", ["z"], Path("media"))[0].to_dict()
    (sub / "m.jsonl").write_text(json.dumps(rel) + "\n")
    merge_manifests([a, sub / "m.jsonl"], tmp_path / "out" / "merged.jsonl")
    last = json.loads((tmp_path / "out" / "merged.jsonl").read_text().splitlines()[-1])
    assert last["modalities"]["image"]["path"] == str(sub / "media" / "z.png")
    # the help and the data guide say how the manifests merge
    p = lumo(["data", "tokenize", "--help"], tmp_path)
    assert "merged in the order given" in " ".join(p.stdout.split())
    assert "merged in the order given" in " ".join(REPO.joinpath("docs", "stage2_data.md").read_text().split())


def test_a_repeated_id_across_manifests_is_one_line_exit_2_and_nothing_written(tmp_path):
    a, b = tmp_path / "images.jsonl", tmp_path / "more_images.jsonl"
    write_manifest(_records("llava_pretrain", ["x1", "x2"], tmp_path), a)
    write_manifest(_records("llava_pretrain", ["x0", "x2"], tmp_path), b)
    t0 = time.time()
    p = lumo(["data", "tokenize", "--manifest", str(a), str(b), "--out", str(tmp_path / "shards")], tmp_path)
    secs = time.time() - t0
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "'llava_pretrain:x2'" in lines[0] and str(a) in lines[0] and str(b) in lines[0], lines[0]
    assert "[ray]" not in p.stdout and not (tmp_path / "shards").exists()
    assert secs < 15, secs  # before Ray is imported (the CLI's own start-up only)


@pytest.fixture(scope="module")
def ran(tmp_path_factory, ray_local):
    """The quick start run as written in a temp folder; every command joins the test session's Ray
    (RAY_ADDRESS) instead of starting one of its own, which is what takes 10-20 s per command."""
    cwd = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    out = []
    for c in quickstart():
        t0 = time.time()
        p = subprocess.run(argv(c), cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
        out.append((c, p, time.time() - t0))
    return cwd, out


def test_the_readme_quick_start_runs_as_written(ran):
    cwd, out = ran
    for c, p, secs in out:
        assert p.returncode == 0, f"{c}: exit {p.returncode} after {secs:.0f} s\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    verify = next(p for c, p, _ in out if " verify " in c)
    assert "verify PASS" in verify.stdout, verify.stdout[-3000:]
    report = json.loads((cwd / "runs/quickstart/verify/report.json").read_text())
    assert report["pass"] and report["checks"]["retokenize"]["n"] == 16, report["checks"].get("retokenize")
    index = json.loads((cwd / "runs/quickstart/shards/index.json").read_text())
    assert index["totals"]["samples"] == 16
    # the merged manifest is where verify re-tokenized from
    src = json.loads((cwd / "runs/quickstart/shards/source.json").read_text())["manifest"]
    assert src == str(cwd / "runs/quickstart/shards/manifest.jsonl")
    assert (cwd / "runs/quickstart/token_lm/metrics.json").exists()
    # each data command's last line is the next command, with the paths it was given
    lasts = [p.stdout.strip().splitlines()[-1] for _, p, _ in out[:5]]
    assert lasts[3] == "next: lumo data verify --shards runs/quickstart/shards --out runs/quickstart/verify"
    assert lasts[4].startswith("next: lumo train token-lm --shards runs/quickstart/shards")
    assert all(s.startswith("next: lumo ") for s in lasts), lasts
    print("quick start seconds:", [round(s, 1) for _, _, s in out])


def test_two_manifests_make_the_shards_of_their_concatenation(ran, tmp_path, ray_local):
    """`--manifest A B` writes the bytes `--manifest <A's lines then B's>` writes: every shard, the index."""
    from lumo_ray.cli.main import main

    cwd, _ = ran
    words = shlex.split(quickstart()[3])
    i = words.index("--manifest")
    a, b = cwd / words[i + 1], cwd / words[i + 2]
    cat = tmp_path / "cat.jsonl"
    cat.write_bytes(a.read_bytes() + b.read_bytes())
    assert main(["data", "tokenize", "--manifest", str(cat), "--out", str(tmp_path / "shards")]) == 0
    merged, single = cwd / "runs/quickstart/shards", tmp_path / "shards"
    assert (merged / "manifest.jsonl").read_bytes() == cat.read_bytes()
    tars = sorted(p.relative_to(single) for p in single.rglob("*.tar"))
    assert tars and tars == sorted(p.relative_to(merged) for p in merged.rglob("*.tar"))
    for t in tars:
        assert (single / t).read_bytes() == (merged / t).read_bytes(), t
    assert (single / "index.json").read_bytes() == (merged / "index.json").read_bytes()


def test_manifests_on_an_object_store_merge_there_too(s3, tmp_path):
    """Manifests named by URI (what check_manifest and tokenize read through storage.locate) merge into
    an object-store --out the same way: the concatenation, and a repeated id refused before any write."""
    from lumo_ray.errors import UserError
    from lumo_ray.storage import locate

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_manifest(_records("audiocaps", ["y1", "y2"], tmp_path), a)
    write_manifest(_records("llava_pretrain", ["x1"], tmp_path), b)
    ua, ub = s3("merge/a.jsonl"), s3("merge/b.jsonl")
    locate(ua).write_atomic(a.read_bytes())
    locate(ub).write_atomic(b.read_bytes())
    merge_manifests([ua, ub], s3("merge/shards/manifest.jsonl"))
    assert locate(s3("merge/shards/manifest.jsonl")).read_bytes() == a.read_bytes() + b.read_bytes()
    with pytest.raises(UserError, match="'audiocaps:y1'"):
        merge_manifests([ua, ua], s3("merge/again/manifest.jsonl"))
    assert not locate(s3("merge/again/manifest.jsonl")).exists()
