"""The VLM's streamed data: each rank's micro-batches in StepSampler's order, the same from Ray Data
actors (1 or 2, order preserved) as in-process; media read from an object store (local S3 server)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lumo_ray.config.vlm import VLMConfig
from lumo_ray.data.synth import write_synth
from lumo_ray.data.vlm_data import ImageStore, SequenceBuilder, StepSampler, VLMDataError, collate, load_image
from lumo_ray.data.vlm_records import MicroBatchDecoder, RecordTable, StreamSpec, data_dir, prefetch, stream_rows
from lumo_ray.models.vlm import build_text, vlm_tokens
from trainers.context import LocalContext
from trainers.vlm import prepare_run, run_loop

QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A run directory planned by the driver on 64 synthetic pairs (no training)."""
    root = tmp_path_factory.mktemp("vstream")
    cfg = VLMConfig()
    cfg.data.path = write_synth(root / "synth", 64, 0, seed=3)["llava_pretrain_dir"]
    cfg.data.eval_size, cfg.data.max_seq_len, cfg.llm.text_warmup_steps = 8, 64, 0
    cfg, run = prepare_run(cfg, root / "run", QUIET)
    return cfg, run


def spec_of(cfg: VLMConfig, run: Path, world: int, rank: int, seed: int = 0) -> StreamSpec:
    tokens = vlm_tokens(build_text(cfg))
    return StreamSpec(table=str(data_dir(run) / "train.arrow"), data=cfg.data, tokenizer=cfg.llm.tokenizer,
                      tokens=tokens, n_visual=cfg.resampler.latents, image_size=cfg.vision.image_size,
                      global_batch=8, world=world, accum=2, seed=seed, rank=rank)


def digest(b: dict) -> tuple:
    return (b["step"], b["micro"], tuple(b["ids"]), b["input_ids"].tolist(), b["labels"].tolist(),
            b["attention_mask"].tolist(), round(float(b["pixel_values"].double().sum()), 6))


def test_stream_follows_the_step_sampler_and_resumes_mid_run(planned):
    """Rows {step, micro} -> the samples StepSampler gives (seed, epoch, world size): each step's
    ranks hold the global batch between them; a stream started at step 3 is the tail of one from 0."""
    cfg, run = planned
    table = RecordTable(data_dir(run) / "train.arrow")
    ids = [r["id"] for r in table.rows(range(len(table)))]
    plan = json.loads((data_dir(run) / "plan.json").read_text())
    assert len(table) == plan["rows"]["train"] == 64 - 8 and ids == sorted(ids)
    streams = {r: list(prefetch(MicroBatchDecoder(spec_of(cfg, run, 2, r)), stream_rows(0, 9, 2), 3)) for r in (0, 1)}
    sampler = StepSampler(len(table), 8, 2, 2, 0)
    assert sampler.steps_per_epoch == 7  # steps 7, 8: epoch 1, reshuffled
    for step in range(9):
        got = [b["ids"] for r in (0, 1) for b in streams[r][2 * step:2 * step + 2]]
        assert [i for g in got for i in g] == [ids[i] for i in sampler.global_indices(step)]
        assert all(len(g) == 2 for g in got)
    assert [b["step"] for b in streams[0]] == [s for s in range(9) for _ in range(2)]
    assert sampler.global_indices(7).tolist() != sampler.global_indices(0).tolist()
    tail = list(prefetch(MicroBatchDecoder(spec_of(cfg, run, 2, 1)), stream_rows(3, 9, 2), 1))
    assert [digest(b) for b in tail] == [digest(b) for b in streams[1][6:]]
    other = list(prefetch(MicroBatchDecoder(spec_of(cfg, run, 2, 1, seed=1)), stream_rows(0, 1, 2), 1))
    assert [b["ids"] for b in other] != [b["ids"] for b in streams[1][:2]]  # the seed orders the data
    b = streams[0][0]  # a ready micro-batch: padded ids / labels / mask + decoded images
    assert b["pixel_values"].shape == (2, 3, cfg.vision.image_size, cfg.vision.image_size)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape


def test_ray_data_stream_is_ordered_and_the_same_with_1_or_2_actors(planned, ray_local):
    """preserve_order on the rank's dataset: 1 or 2 decode actors give the in-process stream exactly."""
    from trainers.vlm_stream import micro_batches, ray_dataset

    cfg, run = planned
    spec = spec_of(cfg, run, 2, 1)
    rows = stream_rows(2, 8, 2)
    want = [digest(b) for b in prefetch(MicroBatchDecoder(spec), rows, 2)]
    for actors in (1, 2):
        cfg.data.decode_actors = actors
        assert ray_dataset(spec, cfg.data, rows).context.execution_options.preserve_order
        got = [digest(b) for b in micro_batches(spec, cfg.data, 2, 8)]
        assert got == want, actors
    cfg.data.decode_actors = 1


def test_vlm_trains_on_media_read_from_an_object_store(planned, tmp_path, s3, ray_local):
    """The raw dataset's image paths are s3:// URIs (local S3 server): decode actors fetch them, the run
    trains, evaluates and reports its memory and padding; a missing object names the sample and URI."""
    from lumo_ray.storage import locate

    cfg, run = planned
    entries = json.loads(next(Path(cfg.data.path).glob("*.json")).read_text())[:40]
    for e in entries:
        uri = s3(f"vlm_media/{Path(e['image']).name}")
        locate(uri).write_atomic((Path(cfg.data.path) / e["image"]).read_bytes())
        e["image"] = uri
    meta = tmp_path / "llava" / "blip_laion_cc_sbu_558k.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps(entries))
    c = VLMConfig()
    c.data.path, c.data.eval_size, c.data.golden_size, c.data.max_seq_len = str(meta.parent), 8, 2, 64
    c.llm.text_warmup_steps = 0
    t = c.train
    t.out, t.steps, t.global_batch, t.warmup_steps, t.ckpt_every, t.eval_every = str(tmp_path / "run"), 3, 8, 1, 3, 0
    c, out = prepare_run(c, t.out, QUIET)
    final = run_loop(c, out, LocalContext(), log=QUIET)
    assert final["step"] == 3 and final["eval_loss"] > 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["memory"]) == {"start_rss_gb", "steps_rss_gb", "peak_rss_gb"} and m["memory"]["peak_rss_gb"] > 0
    assert 0 <= m["pad_fraction"] < 1 and all("pad_fraction" in r for r in m["steps"])
    assert len((out / "golden" / "step_000003.jsonl").read_text().splitlines()) == 2
    img = load_image(entries[0]["image"], 32)
    assert img.shape == (3, 32, 32)
    text = build_text(c)
    s = RecordTable(data_dir(out) / "eval.arrow").samples([0], SequenceBuilder(text, vlm_tokens(text), 8, c.data))[0]
    s.image_paths = [s3("vlm_media/missing.png")]
    with pytest.raises(VLMDataError, match=f"sample {s.id}: s3://lumo/vlm_media/missing.png.*not found"):
        collate([s], ImageStore(32), 0)
