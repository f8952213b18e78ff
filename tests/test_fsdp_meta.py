"""train.meta_init under train.strategy fsdp: the model built on the meta device and each rank's shards
filled in (a preset's random init replayed, a checkpoint's safetensors read tensor by tensor) equals the
whole build bit for bit; on 2 Ray Train workers the losses equal the whole-model path's, the warm start
read shard by shard equals the whole load, and the export (gathered one weight at a time) is whole and
reloads to the same eval loss."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lumo_ray.config.lm import LoraConfig
from lumo_ray.models.base_lm import build_base_lm
from lumo_ray.models.token_lm import load_token_lm, warm_start
from test_token_lm_train import QUIET, make_cfg
from trainers.fsdp import shard, single_process_group

TWO = ["token_lm.train.num_workers=2", "token_lm.train.cpus_per_worker=0.5", "token_lm.train.strategy=fsdp",
       "token_lm.train.steps=3", "token_lm.train.eval_every=3", "token_lm.train.ckpt_every=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    """The token-LM tests' synthetic shards (the same folder: built once per session)."""
    from pipelines.synth_shards import build_synth_shards
    from lumo_ray.uti import load_token_space

    root = tmp_path_factory.getbasetemp() / "lm_synth12_e400"
    shards, manifest, cfg = build_synth_shards(root, 12, 12, overrides=["data.normalize.eval_permille=400"], **QUIET)
    return shards, manifest, load_token_space(cfg.uti)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, data):
    """A tiny base LM saved as a Hugging Face directory (tied head): a warm start read from safetensors."""
    d = tmp_path_factory.mktemp("tiny_base")
    build_base_lm("tiny", data[2].text_vocab, seed=3, overrides={"tie_word_embeddings": True}).save_pretrained(str(d))
    return d


@pytest.fixture
def one_process_group():
    single_process_group()
    yield
    torch.distributed.destroy_process_group()


def gathered(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}


@pytest.mark.parametrize("base,freeze", [("tiny", "full"), ("tiny", "lora"), ("dir", "new_rows")])
def test_meta_build_filled_equals_the_whole_build(data, base_dir, base, freeze, one_process_group):
    """Every weight and buffer bit for bit, and the global RNG after (LoRA draws from it)."""
    ts, base = data[2], str(base_dir) if base == "dir" else base
    torch.manual_seed(0)
    whole = warm_start(base, ts, freeze, 0.02, 0, LoraConfig(), **QUIET)
    want, want_rng = gathered(shard(whole.model, torch.device("cpu"), False)), torch.get_rng_state()
    torch.manual_seed(0)
    ws = warm_start(base, ts, freeze, 0.02, 0, LoraConfig(), meta=True, **QUIET)
    assert all(p.is_meta for n, p in ws.model.named_parameters() if "norm" not in n)  # nothing big allocated
    assert ws.counts == whole.counts
    model = shard(ws.model, torch.device("cpu"), False)
    ws.fill(model, torch.device("cpu"))
    got = gathered(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(torch.get_rng_state(), want_rng)


def test_two_workers_meta_equals_the_whole_build_and_exports_whole(data, base_dir, tmp_path):
    """2 Ray Train workers, a tiny warm start read from safetensors shard by shard (LoRA drawn after it):
    the whole-model path's losses and eval, the same export (each weight gathered in turn), which
    reloads to the run's eval loss."""
    from lumo_ray.codecs.text import build_text_adapter
    from lumo_ray.data.mix import read_split
    from lumo_ray.data.sequences import SequenceBuilder
    from lumo_ray.models.token_lm import task_loss_means, task_loss_sums
    from safetensors import safe_open
    from trainers.token_lm import run_token_lm

    shards, _, ts = data
    runs = {}
    for meta in ("false", "true"):
        cfg = make_cfg(shards, tmp_path / meta, *TWO, f"token_lm.base={base_dir}", "token_lm.freeze=lora",
                       f"token_lm.train.meta_init={meta}")
        runs[meta] = run_token_lm(cfg, **QUIET)
    whole, meta = runs["false"], runs["true"]
    assert np.allclose(whole["loss_history"], meta["loss_history"], atol=1e-5, rtol=0)
    assert abs(whole["eval_loss"] - meta["eval_loss"]) < 1e-5
    assert meta["memory"]["build_rss_gb"] > 0
    a, b = (tmp_path / m / "export" for m in ("false", "true"))
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys()) and not any("lora" in k for k in fb.keys())  # LoRA merged
        assert max((fa.get_tensor(k) - fb.get_tensor(k)).abs().max().item() for k in fa.keys()) < 1e-5
    model, _, _ = load_token_lm(b, expected=ts)  # whole: every weight, the padded vocabulary
    assert model.get_input_embeddings().weight.shape[0] == ts.padded_size
    builder = SequenceBuilder(ts, cfg.token_lm.seq, build_text_adapter(cfg.uti.text).encode)
    # the run's eval: each rank's share of the eval split (equal shares), summed
    tot = sum(task_loss_sums(model, builder, read_split(shards, "eval", rank=r, world_size=2, expected=ts)) for r in (0, 1))
    assert abs(task_loss_means(tot)["all"] - meta["eval_loss"]) < 1e-5
