"""Sequence builder layouts / loss masks / audio crop, and the warm start (resize, init, freeze modes)."""
import numpy as np
import pytest
import torch

from lumo_ray.config import DEFAULT_SPECIALS
from lumo_ray.config.lm import LoraConfig, SequenceConfig
from lumo_ray.data.sequences import IGNORE, SequenceBuilder, SequenceError, collate, const_like, crop_audio, noise_like
from lumo_ray.models.base_lm import build_base_lm
from lumo_ray.models.token_lm import extend_vocab, warm_start
from lumo_ray.token_space import TokenSpace, TokenSpaceError
from small_space import small_token_space


@pytest.fixture(scope="module")
def ts():
    return small_token_space()


def sample(ts, task, n_audio_frames=10):
    s = {"json": {"id": f"s-{task}", "task": task}, "text": np.array([5, 6, 7])}
    if task in ("i2t", "t2i"):
        s["image"] = ts.image_to_global(np.arange(4))
    if task in ("a2t", "t2a"):
        s["audio"] = ts.audio_to_global(np.stack([np.arange(n_audio_frames) % 8, (np.arange(n_audio_frames) + 3) % 8]))
    return s


def enc(text):
    return [ord(c) % 90 + 2 for c in text]


def test_layouts_boundaries_and_loss_only_on_target(ts):
    b = SequenceBuilder(ts, SequenceConfig())
    sp = {n: ts.special_id(n) for n in ts.specials}
    s = b.build(sample(ts, "i2t"))
    img = list(ts.image_to_global(np.arange(4)))
    assert s.input_ids.tolist() == [sp["<|img_start|>"], *img, sp["<|img_end|>"], sp["<|gen_text|>"],
                                    sp["<|text_start|>"], 5, 6, 7, sp["<|text_end|>"]]
    assert s.labels.tolist() == [IGNORE] * 8 + [5, 6, 7, sp["<|text_end|>"]]
    assert s.media_span == (1, 5)
    t = b.build(sample(ts, "t2i"))
    assert t.input_ids.tolist() == [sp["<|text_start|>"], 5, 6, 7, sp["<|text_end|>"], sp["<|gen_img|>"],
                                    sp["<|img_start|>"], *img, sp["<|img_end|>"]]
    assert t.labels.tolist() == [IGNORE] * 7 + img + [sp["<|img_end|>"]]
    a = b.build(sample(ts, "t2a"))
    assert sp["<|gen_aud|>"] in a.input_ids.tolist() and a.labels[-1] == sp["<|aud_end|>"]
    assert ts.audio_phase_errors(a.labels[a.labels != IGNORE][:-1]) == []
    x = b.build(sample(ts, "t"))
    assert x.input_ids.tolist() == [sp["<|text_start|>"], 5, 6, 7, sp["<|text_end|>"]]
    assert x.labels.tolist() == [IGNORE, 5, 6, 7, sp["<|text_end|>"]]
    c = SequenceBuilder(ts, SequenceConfig(delimiters="compact")).build(sample(ts, "a2t"))
    assert sp["<|gen_text|>"] not in c.input_ids.tolist() and sp["<|text_start|>"] not in c.input_ids.tolist()
    with pytest.raises(SequenceError, match="s-i2t.*needs audio"):
        b.build(sample(ts, "i2t"), task="a2t")


def test_audio_crop_on_frame_boundaries_keeps_phase(ts):
    ids = sample(ts, "a2t", n_audio_frames=50)["audio"]
    eval_crop = crop_audio(ids, 2, 21, None)  # 21 tokens -> 10 whole frames
    assert eval_crop.size == 20 and ts.audio_phase_errors(eval_crop) == []
    assert np.array_equal(eval_crop, ids[40:60])  # centred: frames 20..29 of 50
    starts = set()
    for seed in range(20):
        c = crop_audio(ids, 2, 20, np.random.default_rng(seed))
        assert ts.audio_phase_errors(c) == [] and c.size == 20
        starts.add(int(np.nonzero(np.all(np.lib.stride_tricks.sliding_window_view(ids, 20) == c, 1))[0][0]))
    assert len(starts) > 3 and all(s % 2 == 0 for s in starts)
    b = SequenceBuilder(ts, SequenceConfig(max_audio_tokens=20))
    s = b.build(sample(ts, "a2t", 50), rng=np.random.default_rng(0))
    assert s.media_span[1] - s.media_span[0] == 20


def test_instructions_dropout_and_collate(ts):
    none = SequenceBuilder(ts, SequenceConfig()).build(sample(ts, "i2t"))
    fixed = SequenceBuilder(ts, SequenceConfig(instruction="fixed"), enc).build(sample(ts, "i2t"))
    assert fixed.input_ids.tolist()[: len(enc("Describe the image."))] == enc("Describe the image.")
    assert fixed.input_ids.size == none.input_ids.size + len(enc("Describe the image."))
    tb = SequenceBuilder(ts, SequenceConfig(instruction="templates"), enc)
    seen = {tuple(tb.build(sample(ts, "i2t"), rng=np.random.default_rng(i)).input_ids[:8]) for i in range(20)}
    assert len(seen) > 1
    assert tuple(tb.build(sample(ts, "i2t")).input_ids) == tuple(fixed.input_ids)  # eval: first template
    drop = SequenceBuilder(ts, SequenceConfig(modality_dropout=1.0)).build(sample(ts, "i2t"), rng=np.random.default_rng(0))
    assert drop.media_span[0] == drop.media_span[1]
    batch = collate([none, fixed], pad_id=ts.special_id("<|pad_mm|>"))
    assert batch["input_ids"].shape == (2, fixed.input_ids.size)
    assert batch["attention_mask"][0].sum() == none.input_ids.size
    assert (batch["labels"][0, none.input_ids.size:] == IGNORE).all()
    assert ts.audio_phase_errors(noise_like(ts, "audio", 10, np.random.default_rng(0))) == []
    assert ts.check_ids(const_like(ts, "image", 4), "image") == []


def test_warm_start_resize_init_and_freeze_modes(ts):
    base = build_base_lm("tiny", 100, seed=1)
    old = base.get_input_embeddings().weight.detach().clone()
    m = extend_vocab(build_base_lm("tiny", 100, seed=1), ts, init_scale=0.0)
    w = m.get_input_embeddings().weight
    assert w.shape[0] == ts.padded_size == m.get_output_embeddings().weight.shape[0]
    assert torch.equal(w[:100], old) and torch.allclose(w[100:], old.mean(0).expand(w.shape[0] - 100, -1))
    noisy = extend_vocab(build_base_lm("tiny", 100, seed=1), ts, init_scale=0.5).get_input_embeddings().weight
    assert (noisy[100:] - old.mean(0)).std() > 0.1 * old.std()

    ws = warm_start("tiny", ts, "new_rows", seed=1, log=lambda *a: None)
    ids = torch.randint(0, ts.total, (2, 12))
    ws.model(input_ids=ids, labels=ids).loss.backward()
    for p in (ws.model.get_input_embeddings().weight, ws.model.get_output_embeddings().weight):
        assert p.grad[:100].abs().max() == 0 and p.grad[100:].abs().max() > 0
    assert all(p.grad is None for n, p in ws.model.named_parameters() if "embed" not in n and "lm_head" not in n)
    full = warm_start("tiny", ts, "full", seed=1, log=lambda *a: None).counts
    lora = warm_start("tiny", ts, "lora", seed=1, lora=LoraConfig(r=4), log=lambda *a: None).counts
    assert full["trainable"] == full["total"]
    assert ws.counts["effective_trainable"] == 2 * (ts.padded_size - 100) * 64 < lora["effective_trainable"] < full["trainable"]
    small = TokenSpace.from_sizes(text_vocab=200, specials=list(DEFAULT_SPECIALS), special_slots=16, image_codebook=16,
                                  audio_codebooks=0, audio_codebook_size=None,
                                  adapters={"text": {"vocab_size": 200}, "image": {"kind": "vq", "codebook_size": 16}})
    with pytest.raises(TokenSpaceError, match="fewer than the token space's TEXT range"):
        extend_vocab(build_base_lm("tiny", 100), small, 0.02)
