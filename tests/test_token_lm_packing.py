"""Packed token-LM batches (token_lm.seq.pack): each sample in a packed row sees only itself (the
logits of the sample run alone, under LoRA too), no label crosses a sample boundary, and packed and
padded batches give the same eval losses, the same training losses and less padding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lumo_ray.codecs.text import build_text_adapter
from lumo_ray.config.lm import LoraConfig, SequenceConfig
from lumo_ray.data.sequences import IGNORE, Sequence, SequenceBuilder, collate, pack, pack_rows
from lumo_ray.data.shard_reader import ShardDataset
from lumo_ray.models.base_lm import build_base_lm
from lumo_ray.models.token_lm import apply_freeze, target_losses, task_loss_sums, warm_start
from test_fsdp import data, one_process_group  # noqa: F401  (the token-LM tests' shards, built once per session)
from test_token_lm_train import QUIET, make_cfg
from trainers.context import LocalContext
from trainers.token_lm import token_lm_loop

VOCAB = 300
LENGTHS = [40, 7, 12, 40, 5, 2, 61, 9]  # rows of at most 61 tokens (the longest)


def sequences(seed: int = 0, lengths=LENGTHS) -> list[Sequence]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(0, VOCAB, n)
        labels = ids.copy()
        labels[: n // 2] = IGNORE  # a target span at the end, as the builder's layouts have
        out.append(Sequence(ids, labels, "i2t", f"s{i}"))
    return out


def tiny(lora: bool) -> torch.nn.Module:
    model = build_base_lm("tiny", VOCAB, seed=0)
    if lora:
        model = apply_freeze(model, "lora", 100, LoraConfig())
        with torch.no_grad():  # LoRA's B starts at zero: make the adapters change the output
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def per_sample_logits(model, batch: dict, n: int) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return [out[batch["sample_index"] == i] for i in range(n)]


def test_pack_rows_fill_few_even_rows_deterministically():
    rows = pack_rows(LENGTHS, 48)  # capped at the longest (61): 3 rows of 61, 57, 58 tokens
    assert rows == [[6], [0, 2, 4], [3, 7, 1, 5]]
    assert sorted(i for r in rows for i in r) == list(range(len(LENGTHS)))  # every sequence once
    assert pack_rows(LENGTHS, 48) == rows and pack_rows([3, 3, 3], 6) == [[0, 2], [1]]  # ties keep their order
    assert pack_rows(LENGTHS, 200) == [[6, 0, 3, 2, 7, 1, 4, 5]]  # a longer cap: one row, longest first
    assert pack_rows([5, 5, 5, 5], 0) == [[0], [1], [2], [3]]  # a row per sequence: no row is wider than padding


@pytest.mark.parametrize("lora", [False, True])
def test_packed_sample_sees_only_itself(lora):
    model = tiny(lora)
    seqs = sequences()
    batch = pack(seqs, 0, 48)
    assert batch["input_ids"].shape[0] < len(seqs)
    packed = per_sample_logits(model, batch, len(seqs))
    with torch.no_grad():
        for s, got in zip(seqs, packed):
            alone = model(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0]
            assert got.shape == alone.shape and (got - alone).abs().max() < 1e-5, s.id
    # a sample's first label is IGNORE (never the target of the previous sample's last token), and
    # every target's position and label belong to the same sample
    owner, labels = batch["sample_index"], batch["labels"]
    starts = (owner >= 0) & (torch.nn.functional.pad(owner, (1, 0), value=-2)[:, :-1] != owner)
    assert (labels[starts] == IGNORE).all()
    on = labels[:, 1:] != IGNORE
    assert (owner[:, :-1][on] == owner[:, 1:][on]).all()
    assert (labels[owner < 0] == IGNORE).all()
    # change one sample: no other sample's logits move
    other = sequences()
    other[2] = Sequence(np.random.default_rng(9).integers(0, VOCAB, 12), other[2].labels, "i2t", "s2")
    changed = per_sample_logits(model, pack(other, 0, 48), len(other))
    for i, (a, b) in enumerate(zip(packed, changed)):
        if i == 2:
            assert (a - b).abs().max() > 1e-3
        else:
            assert (a - b).abs().max() < 1e-6, i
    # per-sample losses: the padded batch's, sample by sample
    with torch.no_grad():
        (lp, np_), (lc, nc) = target_losses(model, batch), target_losses(model, collate(seqs, 0))
    assert np_.tolist() == nc.tolist() == [n - n // 2 for n in LENGTHS]
    assert (lp - lc).abs().max() < 1e-5


@pytest.fixture(scope="module")
def shard_run(data):  # noqa: F811
    shards, _, ts = data
    cfg = make_cfg(shards, "unused")
    tok = build_text_adapter(cfg.uti.text)
    return shards, ts, cfg, tok


def test_packed_and_padded_eval_losses_match(shard_run):
    shards, ts, cfg, tok = shard_run
    samples = list(ShardDataset(shards, "eval", shuffle=False, expected=ts))
    model = warm_start("tiny", ts, "lora", 0.02, 0, LoraConfig(), log=lambda *a: None).model.eval()
    sums, builders = {}, {}
    for p in (True, False):
        seq = SequenceConfig(**{**vars(cfg.token_lm.seq), "pack": p, "pack_len": 512})
        builders[p] = SequenceBuilder(ts, seq, tok.encode)
        sums[p] = task_loss_sums(model, builders[p], samples, batch_size=8)
    first = [builders[True].build(s, task=t) for s in samples for t in builders[True].tasks_of(s)][:8]
    assert builders[True].batch(first)["input_ids"].shape[0] < 8  # rows shared
    assert sums[True][:, 1].tolist() == sums[False][:, 1].tolist() and sums[True][:, 1].sum() > 0
    means = {p: sums[p][:, 0] / sums[p][:, 1].clamp(min=1) for p in sums}
    assert (means[True] - means[False]).abs().max() < 1e-5


@pytest.mark.parametrize("freeze,strategy", [("new_rows", "ddp"), ("lora", "fsdp")])
def test_packed_training_matches_padded_with_less_padding(data, tmp_path, freeze, strategy,  # noqa: F811
                                                          one_process_group):  # noqa: F811
    shards, _, ts = data
    runs, reps = {}, {}
    for p in (True, False):
        cfg = make_cfg(shards, tmp_path / str(p), "token_lm.train.steps=4", "token_lm.train.eval_every=4",
                       "token_lm.train.ckpt_every=4", f"token_lm.freeze={freeze}",
                       f"token_lm.train.strategy={strategy}", f"token_lm.seq.pack={p}",
                       "token_lm.seq.pack_len=512")  # rows above the longest: the 4 sequences share rows
        reps[p] = []
        runs[p] = token_lm_loop(cfg, LocalContext(on_report=lambda m, ck, r=reps[p]: r.append(m)), ts=ts,
                                eval_start=False, **QUIET)
    assert np.allclose(runs[True]["loss_history"], runs[False]["loss_history"], atol=1e-5, rtol=0)
    assert abs(runs[True]["eval_loss"] - runs[False]["eval_loss"]) < 1e-5
    for task, v in runs[False]["eval"].items():
        assert abs(runs[True]["eval"][task] - v) < 1e-5, task
    # padding: reported per log step and for the run (metrics.json), lower when packed
    on_disk = json.loads((tmp_path / "True" / "metrics.json").read_text())
    assert on_disk["pad_fraction"] == runs[True]["pad_fraction"]
    assert 0 <= runs[True]["pad_fraction"] < runs[False]["pad_fraction"]
    assert 0 <= reps[True][-1]["pad_fraction"] < reps[False][-1]["pad_fraction"]
    assert runs[True]["tokens_per_s"] > 0
