"""VLM model + data pieces, no Ray: placeholders, injection, freezing, labels, split, generation, export."""
from __future__ import annotations

import json

import pytest
import torch

from lumo_ray.config.vlm import VLMConfig
from lumo_ray.data.manifest import Record
from lumo_ray.data.synth import write_synth
from lumo_ray.data.vlm_data import SequenceBuilder, VLMDataError, collate, prepare_data
from lumo_ray.eval.vlm_ablation import eval_loss, run_ablation
from lumo_ray.models.vlm import VLMInputError, build_text, build_vlm, load_export, save_export


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    syn = write_synth(root / "synth", 80, 0, seed=1)
    cfg = VLMConfig()
    cfg.data.path = syn["llava_pretrain_dir"]
    cfg.data.eval_size = 16
    text = build_text(cfg)
    model = build_vlm(cfg, text, seed=0)
    data = prepare_data(cfg.data, text, model.tokens, model.n_visual, cfg.vision.image_size, root / "splits.json")
    return cfg, text, model, data, root


def test_placeholder_expands_to_start_n_pads_end_and_labels_cover_caption_and_eos(setup):
    cfg, text, model, data, _ = setup
    s = data.train[0]
    tk = model.tokens
    i = s.input_ids.index(tk.im_start)
    assert s.input_ids[i + 1:i + 1 + model.n_visual] == [tk.image_pad] * model.n_visual
    assert s.input_ids[i + 1 + model.n_visual] == tk.im_end
    lab = [x for x in s.labels if x != -100]
    assert lab == text.encode(" " + s.caption) + [tk.eos]
    assert s.labels[: s.prompt_len] == [-100] * s.prompt_len and s.label_len == len(lab)


def test_multi_image_prompt_fills_placeholders_in_order_and_mismatch_names_sample(setup):
    cfg, text, model, data, _ = setup
    a, b = data.train[0].image_paths[0], data.train[1].image_paths[0]
    builder = SequenceBuilder(text, model.tokens, model.n_visual, cfg.data)
    rec = Record(id="x:two", source="x", group="g", task="i2t", modalities={"image": {"paths": [a, b]}},
                 text={"prompt": "<image> then <image>", "caption": "two pictures"})
    s = builder.build(rec)
    batch = collate([s], data.images, model.tokens.pad)
    vis = torch.stack([torch.full((model.n_visual, 64), 1.0), torch.full((model.n_visual, 64), 2.0)])
    emb = model.embed(batch["input_ids"], vis, batch["image_counts"], batch["ids"])
    pads = (batch["input_ids"][0] == model.tokens.image_pad).nonzero().flatten()
    assert torch.all(emb[0, pads[: model.n_visual]] == 1.0) and torch.all(emb[0, pads[model.n_visual:]] == 2.0)
    with pytest.raises(VLMDataError, match="x:bad.*2 <image> placeholder.*1 image"):
        builder.build(Record(id="x:bad", source="x", group="g", task="i2t", modalities={"image": {"path": a}},
                             text={"prompt": "<image><image>", "caption": "c"}))
    with pytest.raises(VLMInputError, match="sample x:two"):
        model.embed(batch["input_ids"], vis[:1], [1], ["x:two"])


def test_align_stage_freezes_vision_and_llm_and_counts_params(setup):
    _, _, model, _, _ = setup
    counts = model.apply_stage("align")
    assert counts["vision"]["trainable"] == 0 and counts["llm"]["trainable"] == 0
    assert counts["connector"]["frozen"] == 0 and counts["trainable"] == counts["connector"]["trainable"] > 0
    assert all(not p.requires_grad for p in model.llm.parameters())
    model.train()
    assert not model.llm.training and not model.vision.training and model.connector.training


def test_truncation_and_zero_label_stats(setup):
    cfg, text, model, data, _ = setup
    import copy
    from lumo_ray.data.vlm_data import length_stats
    c = copy.deepcopy(cfg.data)
    s0 = data.train[0]
    c.max_seq_len = s0.prompt_len + 2
    builder = SequenceBuilder(text, model.tokens, model.n_visual, c)
    rec = Record(id=s0.id, source="x", group="g", task="i2t", modalities={"image": {"path": s0.image_paths[0]}},
                 text={"prompt": s0.meta["prompt"], "caption": s0.caption})
    s = builder.build(rec)
    assert s.truncated and len(s.input_ids) == c.max_seq_len and s.label_len == 2
    c.max_seq_len = 4  # the prompt alone does not fit: images kept, no labels
    z = SequenceBuilder(text, model.tokens, model.n_visual, c).build(rec)
    assert z.label_len == 0 and z.input_ids.count(model.tokens.image_pad) == model.n_visual
    st = length_stats([s, z, s0])
    assert st["truncated_pct"] == pytest.approx(200 / 3) and st["zero_label_pct"] == pytest.approx(100 / 3)


def test_stratified_split_persisted_and_golden_from_eval(setup):
    cfg, _, _, data, root = setup
    doc = json.loads((root / "splits.json").read_text())
    ev = {e["id"] for e in doc["eval"]}
    assert len(ev) == cfg.data.eval_size and not ev & {e["id"] for e in doc["train"]}
    assert all(set(e) == {"id", "bucket", "label_len"} for e in doc["eval"])
    assert set(doc["golden"]) <= ev and len(doc["golden"]) == cfg.data.golden_size
    for b, c in doc["bucket_counts"].items():  # every populated bucket is represented in eval
        if c["train"] + c["eval"] >= 4:
            assert c["eval"] >= 1, b


def test_batched_left_padded_generation_matches_one_by_one(setup):
    _, _, model, data, _ = setup
    model.eval()
    samples = data.golden[:3]
    batched = model.generate(collate(samples, data.images, model.tokens.pad, left_pad=True, prompt_only=True), 12)
    single = [model.generate(collate([s], data.images, model.tokens.pad, left_pad=True, prompt_only=True), 12)[0]
              for s in samples]
    assert batched == single and all(len(g) > 0 for g in batched)


def test_export_reload_gives_same_eval_loss_and_ablation_report(setup):
    cfg, text, model, data, root = setup
    with torch.no_grad():  # move the connector away from its init so the check is meaningful
        for p in model.connector.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = eval_loss(model, data.eval, data.images, 16, 4)
    save_export(model, cfg, root / "export")
    m2, cfg2, _ = load_export(root / "export")
    after = eval_loss(m2, data.eval, data.images, 16, 4)
    assert after["loss"] == pytest.approx(before["loss"], abs=1e-6) and after["tokens"] == before["tokens"]
    with pytest.raises(ValueError, match="16 held-out samples .* < 64"):
        run_ablation(m2, data.eval, data.images, n=16, seed=0)  # SPEC: a held-out set of 64-256
    rep = run_ablation(m2, data.eval, data.images, n=16, seed=0, allow_small_n=True)
    assert set(rep["mean_loss"]) == {"correct", "shuffled", "zero", "noise"} and rep["n"] == 16
    assert set(rep["win_rate"]) == {"shuffled", "zero", "noise"}
    assert set(rep["stats"]) == {"shuffled", "zero", "noise", "zero_vs_shuffled"}
    assert all(set(s) >= {"n", "gap", "ci95", "win", "p"} for s in rep["stats"].values())
    assert rep["gating"] is False and rep["pass"] is False  # a small-n report never gates
