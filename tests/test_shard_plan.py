"""The streaming shard plan (no Ray): the same shards as the in-memory rule, from byte ranges."""
import json
import random

from lumo_ray.data.manifest import Record, read_manifest
from lumo_ray.data.shard_plan import plan_manifest, shard_records
from lumo_ray.data.tokenize import plan_shards, shard_input_digest
from lumo_ray.storage import locate


def rec(i: int, split) -> dict:
    return Record(id=f"r{i:05d}", source="s", group=f"g{i // 3}", task="t", text={"prompt": "", "caption": f"c {i}"},
                  split=split).to_dict()


def write(path, rows, bad_at=(), newline="\n"):
    lines = [json.dumps(r) for r in rows]
    for k in bad_at:
        lines.insert(k, '{"id": "broken", "task": ')
    path.write_bytes((newline.join(lines) + newline).encode())


def same_as_in_memory(manifest, out, shard_size=7):
    recs, errs = read_manifest(manifest)
    ref = plan_shards(recs, shard_size)
    plan = plan_manifest(manifest, shard_size, "cfg", locate(out), log=lambda *a: None)
    assert [t.key for t in plan.tasks] == sorted(ref)
    for t in plan.tasks:
        got = shard_records(t, plan.manifest, plan.base)
        assert [r.to_dict() for r in got] == [r.to_dict() for r in ref[t.key]]
        assert t.records == len(got) and t.digest == shard_input_digest(ref[t.key], "cfg")
    assert [e.to_dict() for e in plan.read_errors] == [e.to_dict() for e in errs]
    assert plan.records == len(recs)
    return plan


def test_sorted_manifest_streams_with_splits_errors_and_crlf(tmp_path):
    rows = [rec(i, random.Random(i).choice(["train", "eval", None])) for i in range(50)]
    write(tmp_path / "m.jsonl", rows, bad_at=(4, 30), newline="\r\n")
    plan = same_as_in_memory(tmp_path / "m.jsonl", tmp_path / "out")
    assert not plan.sorted_copy and len(plan.read_errors) == 2 and "line 5" in plan.read_errors[0].detail
    assert {t.split for t in plan.tasks} == {"train", "eval"}


def test_unsorted_manifest_is_sorted_once_into_the_output(tmp_path):
    rows = [rec(i, "train" if i % 4 else "eval") for i in range(40)]
    random.Random(0).shuffle(rows)
    write(tmp_path / "m.jsonl", rows, bad_at=(10,))
    lines = []
    out = tmp_path / "out"
    out.mkdir()
    plan = plan_manifest(tmp_path / "m.jsonl", 7, "cfg", locate(out), log=lines.append)
    assert plan.sorted_copy and plan.manifest == str(out / "manifest.sorted.jsonl")
    assert "not sorted by id" in lines[0] and len(plan.read_errors) == 1
    same_as_in_memory(tmp_path / "m.jsonl", out)
