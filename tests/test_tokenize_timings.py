"""A tokenize run returns its per-stage seconds with its summary (`timings`): every stage of
pipelines.tokenize.TIMINGS as [wall, CPU], the steady-state rate, each actor pool's process CPU and
start-up; none of it lands in the output folder (its bytes stay a function of the inputs)."""
from __future__ import annotations

import json

from lumo_ray.config import LumoConfig, load_config
from pipelines.tokenize import TIMINGS, run_tokenize


def text_manifest(path, n: int) -> None:
    """n caption-only records (task t), ids in order, every 10th in eval."""
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i:04d}", "source": "synthetic", "group": f"g{i}", "task": "t",
                                 "modalities": {}, "text": {"prompt": "", "caption": f"a dog number {i} runs"},
                                 "split": "eval" if i % 10 == 0 else "train", "meta": {}}, sort_keys=True) + "\n")


def test_a_run_records_its_stage_timings(ray_local, tmp_path):
    text_manifest(tmp_path / "manifest.jsonl", 40)
    cfg = load_config(LumoConfig, None, ["data.tokenize.shard_size=8", "data.tokenize.batch_size=4"])
    out = tmp_path / "shards"
    summary = run_tokenize(tmp_path / "manifest.jsonl", cfg, out, actors=1, log=lambda *a: None)
    t = summary["timings"]
    assert set(t["seconds"]) == set(TIMINGS)  # every stage ran
    assert all(len(v) == 2 and min(v) >= 0 for v in t["seconds"].values())  # [wall, cpu]
    driver = [k for k in TIMINGS if k.startswith("driver_")]
    assert sum(t["seconds"][k][0] for k in driver) <= t["seconds"]["total"][0] + 1e-6
    assert t["shards_written"] == 6 and t["steady_samples_per_s"] > 0  # 36 train + 4 eval records
    for pool in ("loader", "tokenizer"):
        assert t["actor_process_cpu"][pool] > 0 and 0 <= t["actor_started_s"][pool] <= t["actor_ready_s"][pool]
    assert not list(out.rglob("*timings*")) and "timings" not in (out / "summary.json").read_text()
    # a re-run with every shard complete starts no actor: driver stages only
    again = run_tokenize(tmp_path / "manifest.jsonl", cfg, out, actors=1, log=lambda *a: None)["timings"]
    assert again["shards_written"] == 0 and again["steady_samples_per_s"] is None
    assert set(again["seconds"]) == {"driver_token_space", "driver_plan", "driver_finish", "total"}
