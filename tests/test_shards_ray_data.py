"""Token-LM shards read by Ray Data's own reader (`ray.data.read_webdataset`, Ray 2.60).

With Ray's defaults a mixed set fails: an image sample has no `audio.npy` (and an audio one no
`image.npy`), so a block's column holds arrays beside missing values, and Ray's automatic cast of
ndarray columns to its tensor type refuses it. The one setting that makes every sample read is
`DataContext.enable_tensor_extension_casting = False` (docs/stage2_data.md, "Reading shards with
Ray Data"): each member then comes back as the array the tokenizer wrote, a missing one as None or
NaN (a pandas gap) (and the json member as a struct holding every row's keys, None where a sample has none)."""
from pathlib import Path

import numpy as np
import pytest

from pipelines.synth_shards import build_synth_shards
from lumo_ray.data.shards import iter_tar, load_index


def pruned(d):
    """A json member without its None values (Ray gives each row the keys of every row)."""
    return {k: pruned(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    """A mixed set in several tars: 6 images and 6 clips, 3 samples per shard."""
    out, _, _ = build_synth_shards(tmp_path_factory.mktemp("rd") / "synth", 6, 6, log=lambda *a, **k: None,
                                   overrides=["data.tokenize.shard_size=3", "data.normalize.eval_permille=250"])
    return out


def test_read_webdataset_reads_every_sample_of_a_mixed_set(shards, ray_local):
    import ray

    index = load_index(shards)
    tars = [str(Path(shards) / s["name"]) for s in index["shards"]]
    want = {s["__key__"]: s for t in tars for s in iter_tar(t)}  # our reader: the arrays written
    mods = {m for s in want.values() for m in ("image", "audio") if m in s}
    assert len(tars) >= 4 and mods == {"image", "audio"} and len(want) == index["totals"]["samples"]

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_tensor_extension_casting
    ctx.enable_tensor_extension_casting = False  # the setting: keep each array as written
    try:
        rows = ray.data.read_webdataset(tars).take_all()
    finally:
        ctx.enable_tensor_extension_casting = before
    assert sorted(r["__key__"] for r in rows) == sorted(want)
    for r in rows:
        w = want[r["__key__"]]
        assert pruned(r["json"]) == pruned(w["json"])  # a struct column: every row has every key, absent ones None
        for f in ("text", "prompt", "image", "audio"):
            got = r.get(f"{f}.npy")
            if f not in w:
                assert not isinstance(got, np.ndarray)  # absent from this sample: None, or NaN (pandas)
            else:
                assert isinstance(got, np.ndarray) and got.dtype == w[f].dtype and np.array_equal(got, w[f])
