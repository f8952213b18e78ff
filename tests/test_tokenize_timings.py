"""A tokenize run returns its per-stage seconds with its summary (`timings`): every stage of
pipelines.tokenize.TIMINGS as [wall, CPU], the steady-state rate, each actor pool's process CPU and
start-up; none of it lands in the output folder (its bytes stay a function of the inputs)."""
from __future__ import annotations

import json
import pickle

import numpy as np

from lumo_ray.codecs.base import ImageInput, state_digest
from lumo_ray.config import LumoConfig, load_config
from lumo_ray.data.tokenize import SampleTokenizer
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


def test_a_tokenizer_given_the_drivers_built_weights_encodes_the_same():
    """The tokenizer actors take the driver's token space and random presets' weights (`built()`, through
    Ray's object store) instead of drawing them again: same identity, same weights, same codes. The
    default config: a random audio preset (handed over) and the shipped trained VQ (read from its file)."""
    cfg = load_config(LumoConfig, None, [])
    driver = SampleTokenizer(cfg.uti)
    built = pickle.loads(pickle.dumps(driver.built(), protocol=5))  # plain data, as the object store holds it
    assert set(built["weights"]) == {"audio"}
    actor = SampleTokenizer(cfg.uti, built=built)
    assert actor.adapters.audio._weights is not None and actor.adapters.audio._model is None  # nothing drawn yet
    actor.build_models()
    assert actor.ts.hash == driver.ts.hash and actor.adapters.audio._weights is None
    for m in ("audio", "image"):
        assert state_digest(getattr(actor.adapters, m).model) == state_digest(getattr(driver.adapters, m).model)
    rng = np.random.default_rng(0)
    a = driver.adapters.audio
    clips = [a.prepare(rng.standard_normal(int(a.sample_rate * s)).astype(np.float32) * 0.1, a.sample_rate)
             for s in (0.5, 1.0, 1.0)]
    for x, y in zip(a.encode_batch(clips), actor.adapters.audio.encode_batch(clips)):
        assert np.array_equal(x.codes, y.codes)
    r = driver.adapters.image.image_size
    images = [ImageInput(pixels=rng.random((3, r, r), dtype=np.float32)) for _ in range(2)]
    for x, y in zip(driver.adapters.image.encode_batch(images), actor.adapters.image.encode_batch(images)):
        assert np.array_equal(x, y)


def test_without_a_loader_pool_or_with_calls_at_once_the_actors_write_the_same_bytes(ray_local, tmp_path):
    """data.tokenize.loaders 0: no loader actor, the tokenizer actors read and decode their shards (one
    process fewer on a few cores); calls_per_actor 2: one actor encodes two shards at once in two threads
    over one copy of the models. The shards are byte for byte those of a run with a loader pool and one
    call at a time."""
    from lumo_ray.data.manifest import read_manifest, write_manifest
    from lumo_ray.data.normalize import normalize_local
    from lumo_ray.data.synth import write_synth

    write_synth(tmp_path / "synth", 2, 6, seed=0)
    recs = []
    for src in ("audiocaps", "llava_pretrain"):
        normalize_local(src, tmp_path / "synth" / src, tmp_path / f"norm_{src}")
        recs += read_manifest(tmp_path / f"norm_{src}" / "manifest.jsonl")[0]
    write_manifest(recs, tmp_path / "manifest.jsonl")
    outs, logs = {}, []
    for loaders, calls in ((1, 1), (0, 1), (0, 2)):
        cfg = load_config(LumoConfig, None, ["data.tokenize.shard_size=4", "data.tokenize.batch_size=2",
                                             f"data.tokenize.loaders={loaders}", f"data.tokenize.calls_per_actor={calls}"])
        outs[loaders, calls] = tmp_path / f"shards{loaders}{calls}"
        t = run_tokenize(tmp_path / "manifest.jsonl", cfg, outs[loaders, calls], actors=1, log=logs.append)["timings"]
        assert t["loaders"] == loaders and t["calls_per_actor"] == calls and t["shards_written"] >= 2
        if loaders == 0:
            assert t["actor_started_s"]["loader"] is None and t["seconds"]["load_decode"][0] > 0
    assert any("1 tokenizer actor(s) x 2 calls at once" in line for line in logs)
    files = sorted(p.relative_to(outs[1, 1]) for p in outs[1, 1].rglob("*") if p.is_file())
    assert any(f.suffix == ".tar" for f in files)
    for other in ((0, 1), (0, 2)):
        assert files == sorted(p.relative_to(outs[other]) for p in outs[other].rglob("*") if p.is_file())
        for f in files:
            if f.name != "config.yaml":  # the run's config: it names its loader and call counts
                assert (outs[1, 1] / f).read_bytes() == (outs[other] / f).read_bytes(), (other, f)
