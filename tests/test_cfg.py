"""Classifier-free guidance (issue 34): caption dropout in stage-4 training, `guidance_scale` at generation
(library, CLI, batch generation, serving). Scale 1 is no guidance byte for byte; another scale changes
the output and gives the same bytes for the same seed; an invalid scale is refused naming the field."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import lumo_ray.generate as G
from lumo_ray.cli import main
from lumo_ray.config import LumoConfig, ServeConfig
from lumo_ray.config.lm import FidelityConfig, SequenceConfig
from lumo_ray.data.sequences import IGNORE, SequenceBuilder
from lumo_ray.generate import (GenOptions, build_prompt, check_guidance, generate, generate_jobs, generate_spans,
                               guided_generate, load_run, row_seed, task_spec)
from small_space import small_token_space
from test_generate_decode import make_tiny_run

CAPTIONS = {"t2i": ["two red circles on the left", "one blue square in the center"],
            "t2a": ["three short high beeps", "one long low beep"]}
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load_run(make_tiny_run(tmp_path_factory.mktemp("cfg_run")))


def _digest(d: Path) -> dict[str, str]:
    """sha256 of each output file, generations.jsonl without the file paths (which name the directory)."""
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
           if p.name not in ("options.json", "generations.jsonl")}
    rows = [{k: v for k, v in json.loads(x).items() if k != "file"} for x in (d / "generations.jsonl").read_text().splitlines()]
    return {**out, "generations.jsonl": json.dumps(rows)}


# -- generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["t2i", "t2a"])
def test_scale_1_is_no_guidance_byte_for_byte(run, task, tmp_path, monkeypatch):
    plain = generate(run, task, tmp_path / "plain", prompt=CAPTIONS[task][0], n=2, opts=GenOptions(seed=7), **QUIET)
    monkeypatch.setattr(G, "guided_generate", lambda *a, **k: pytest.fail("scale 1 entered the guided loop"))
    one = generate(run, task, tmp_path / "one", prompt=CAPTIONS[task][0], n=2,
                   opts=GenOptions(seed=7, guidance_scale=1.0), **QUIET)
    assert [r["ids"] for r in plain] == [r["ids"] for r in one]
    assert _digest(tmp_path / "plain") == _digest(tmp_path / "one")  # PNG / WAV and generations.jsonl


@pytest.mark.parametrize("task", ["t2i", "t2a"])
def test_guidance_changes_the_output_and_a_seed_gives_the_same_bytes(run, task, tmp_path):
    o = GenOptions(seed=7, guidance_scale=3.0)
    a = generate(run, task, tmp_path / "a", prompt=CAPTIONS[task][0], n=2, opts=o, **QUIET)
    b = generate(run, task, tmp_path / "b", prompt=CAPTIONS[task][0], n=2, opts=o, **QUIET)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert all(r["ok"] for r in a)  # guided spans still obey the span grammar (constraint after the mix)
    plain = generate_spans(run, task, [build_prompt(run, task, caption=CAPTIONS[task][0])] * 2, GenOptions(seed=7))
    assert [r["ids"] for r in a] != [g.tolist() for g in plain]
    other = generate_spans(run, task, [build_prompt(run, task, caption=CAPTIONS[task][0])] * 2,
                           replace(o, guidance_scale=5.0))
    assert [r["ids"] for r in a] != [g.tolist() for g in other]
    # a row's tokens do not depend on the rows batched with it (its own seed, its own cache rows)
    ps = [build_prompt(run, task, caption=c) for c in CAPTIONS[task] + ["one"]]
    together = generate_spans(run, task, ps, o)
    alone = [generate_spans(run, task, [p], o, seeds=[row_seed(7, i)])[0] for i, p in enumerate(ps)]
    assert all(np.array_equal(x, y) for x, y in zip(together, alone))


def test_guided_loop_is_transformers_search_when_both_halves_agree(run):
    """With the caption prompt as its own 'unconditional' prompt, uncond + s x (cond - uncond) = cond, so
    the hand-written loop (2B rows, left padding, positions, KV cache) must give `generate`'s tokens."""
    from transformers import LogitsProcessorList

    from lumo_ray.generate import RowSampler, _strip
    from lumo_ray.models.constrained import SpanConstraint

    p = build_prompt(run, "t2i", caption=CAPTIONS["t2i"][0])
    spec = task_spec(run, "t2i", GenOptions())
    for greedy in (True, False):
        o = GenOptions(seed=3, greedy=greedy)
        ref = generate_spans(run, "t2i", [p], o)[0]
        procs = [SpanConstraint(run.ts, spec, len(p), run.builder.pad_id, G.model_vocab(run.model))]
        if not greedy:
            procs.append(RowSampler([row_seed(3, 0)], o))
        with torch.no_grad():
            seqs = guided_generate(run.model, [p], p, 4.0, LogitsProcessorList(procs), spec.max_new_tokens,
                                   spec.terminators, run.builder.pad_id, torch.device("cpu"))
        assert np.array_equal(_strip(seqs[0, len(p):].numpy(), spec.terminators, run.builder.pad_id), ref)


@pytest.mark.parametrize("task", ["t2i", "t2a"])
def test_unconditional_prompt_is_the_dropped_training_layout(run, task):
    """What generation conditions on without a caption is exactly what caption dropout trains."""
    sp = run.builder.sp
    u = build_prompt(run, task, uncond=True)
    gen, start = ("<|gen_img|>", "<|img_start|>") if task == "t2i" else ("<|gen_aud|>", "<|aud_start|>")
    assert u.tolist() == [sp["<|text_start|>"], sp["<|text_end|>"], sp[gen], sp[start]]
    sample = {"json": {"id": "x", "task": task}, "text": np.asarray(run.adapters.text.encode(CAPTIONS[task][0]))}
    media = {"t2i": "image", "t2a": "audio"}[task]
    span = task_spec(run, task, GenOptions()).length
    sample[media] = (np.arange(span) % 2 + run.ts.range("IMAGE").start if task == "t2i"
                     else np.array([r.start for r in run.ts.audio_ranges])[np.arange(span) % run.ts.num_codebooks])
    seq = run.builder.build(sample, task=task, drop_caption=True)
    assert seq.extra["caption_dropped"]
    first = int(np.nonzero(seq.labels != IGNORE)[0][0])
    assert seq.input_ids[:first].tolist() == u.tolist()


def test_jobs_batch_generation_and_fidelity_carry_the_scale(run, tmp_path):
    from lumo_ray.batch_generate import generate_unit
    from lumo_ray.data.manifest import Record
    from lumo_ray.eval.fidelity import _gen_options

    o = GenOptions(seed=4, guidance_scale=2.5)
    p = build_prompt(run, "t2i", caption=CAPTIONS["t2i"][1])
    alone = generate_spans(run, "t2i", [p], o)[0]
    # serving's batches group requests by their options: a guided and a plain request in one call
    got = generate_jobs(run, [("t2i", p, 1, o), ("t2i", p, 1, GenOptions(seed=4))])
    assert np.array_equal(got[0][0], alone) and not np.array_equal(got[1][0], alone)
    # batch generation rebuilds the options from a dict (Ray) and seeds a record seed + its index
    rec = Record(id="r0", source="synth", group="r0", task="t2i", text={"prompt": "", "caption": CAPTIONS["t2i"][1]})
    unit = generate_unit(run, "t2i", [{"index": 0, "record": rec.to_dict()}], asdict(o), 1)
    assert f'"ids": {alone.tolist()}'.replace(" ", "") in unit["rows"].replace(" ", "")
    assert _gen_options(FidelityConfig(guidance_scale=3.0)).guidance_scale == 3.0


# -- caption dropout ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ts():
    return small_token_space()


def _sample(ts, task: str, i: int) -> dict:
    s = {"json": {"id": f"s{i}", "task": task}, "text": np.array([5, 6, 7, 8])}
    s["image"] = ts.image_to_global(np.arange(4))
    s["audio"] = ts.audio_to_global(np.stack([np.arange(10) % 8, (np.arange(10) + 3) % 8]))
    return s


def _key(i: int, epoch: int = 0) -> np.random.Generator:
    return np.random.default_rng([0, epoch, i, 0, 1])  # trainers.token_lm.TrainSequences.crop_key's shape


def test_caption_dropout_replaces_the_seeded_fraction_of_t2x_captions_only(ts):
    n, p = 2000, 0.1
    b = SequenceBuilder(ts, SequenceConfig(caption_dropout=p))
    caption = [5, 6, 7, 8]
    for task in ("t2i", "t2a"):
        seqs = [b.build(_sample(ts, task, i), task=task, rng=_key(i)) for i in range(n)]
        dropped = [s.extra["caption_dropped"] for s in seqs]
        assert abs(sum(dropped) / n - p) < 4 * (p * (1 - p) / n) ** 0.5  # binomial: 4 sigma
        for s, d in zip(seqs, dropped):
            has = s.input_ids[1:5].tolist() == caption
            assert has != d  # dropped: no caption tokens, the same delimiters and target
            assert (s.labels != IGNORE).sum() == len(seqs[0].labels[seqs[0].labels != IGNORE])
        again = [b.build(_sample(ts, task, i), task=task, rng=_key(i)).extra["caption_dropped"] for i in range(n)]
        assert again == dropped  # a function of the sample's key: a resumed run drops the same ones
        other = [b.build(_sample(ts, task, i), task=task, rng=_key(i, epoch=1)).extra["caption_dropped"]
                 for i in range(n)]
        assert other != dropped  # and another epoch drops others
        # eval (no generator) never drops
        assert not b.build(_sample(ts, task, 0), task=task).extra["caption_dropped"]
    every = SequenceBuilder(ts, SequenceConfig(caption_dropout=1.0))
    for task in ("i2t", "a2t"):  # x2t rows are never touched: the caption is their target
        for i in range(50):
            s = every.build(_sample(ts, task, i), task=task, rng=_key(i))
            assert s.labels[s.labels != IGNORE].tolist()[:4] == caption and "caption_dropped" not in s.extra
    # off (the default): the generator's stream is untouched, so earlier runs' sequences are unchanged
    off = SequenceBuilder(ts, SequenceConfig(instruction="none"))
    r1, r2 = _key(1), _key(1)
    off.build(_sample(ts, "t2i", 1), task="t2i", rng=r1)
    assert r1.random() == r2.random()
    with pytest.raises(ValueError, match="caption_dropout must be in"):
        SequenceBuilder(ts, SequenceConfig(caption_dropout=1.5))


# -- validation: library, CLI, serving --------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.5, 0, -1.0, float("nan"), float("inf"), 20.5, True, "3"])
def test_guidance_scale_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"guidance_scale: must be a number in \[1, 20\]"):
        check_guidance(bad, "t2i")


def test_guidance_scale_on_a_text_task_is_refused(run):
    assert check_guidance(1, "i2t") == 1.0 and check_guidance(20, "t2a") == 20.0
    with pytest.raises(ValueError, match="guidance applies to t2i / t2a"):
        check_guidance(3.0, "a2t")
    with pytest.raises(ValueError, match="guidance_scale: must be"):
        generate_spans(run, "t2i", [build_prompt(run, "t2i", caption="a")], GenOptions(guidance_scale=0.9))


def test_cli_refuses_a_bad_scale_in_one_line(run, tmp_path, capsys):
    base = ["generate", "--run", str(run.dir), "--out", str(tmp_path / "g")]
    assert main(base + ["--task", "t2i", "--prompt", "a red circle", "--guidance-scale", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --guidance-scale: must be a number in [1, 20]")
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    assert main(base + ["--task", "i2t", "--input", str(img), "--guidance-scale", "3"]) == 2
    assert "guidance applies to t2i / t2a" in capsys.readouterr().err
    # the config key is checked too, named as such
    assert main(base + ["--task", "t2a", "--prompt", "a beep", "--set", "generate.guidance_scale=50"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: generate.guidance_scale: must be")
    assert not (tmp_path / "g" / "generations.jsonl").exists()


def test_cli_generate_with_guidance_writes_the_library_bytes(run, tmp_path):
    assert main(["generate", "--run", str(run.dir), "--task", "t2i", "--prompt", CAPTIONS["t2i"][0], "--n", "2",
                 "--seed", "7", "--guidance-scale", "3", "--out", str(tmp_path / "cli")]) == 0
    generate(run, "t2i", tmp_path / "lib", prompt=CAPTIONS["t2i"][0], n=2, opts=GenOptions(seed=7, guidance_scale=3.0),
             **QUIET)
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "lib")


def test_serving_request_field(run):
    import base64
    import io

    from PIL import Image

    from lumo_ray.serving import RequestError, parse_request

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    lim = ServeConfig()
    ok = parse_request(json.dumps({"task": "t2i", "prompt": "a red circle", "guidance_scale": 3}).encode(),
                       ["t2i", "i2t"], lim)
    assert ok.opts.guidance_scale == 3.0
    assert parse_request(b'{"task": "t2i", "prompt": "a"}', ["t2i"], lim).opts.guidance_scale == 1.0
    for body, tasks in (({"task": "t2i", "prompt": "a", "guidance_scale": 0.5}, ["t2i"]),
                        ({"task": "t2i", "prompt": "a", "guidance_scale": "3"}, ["t2i"]),
                        ({"task": "t2i", "prompt": "a", "guidance_scale": 21}, ["t2i"]),
                        ({"task": "i2t", "input": png, "guidance_scale": 3}, ["i2t"])):
        with pytest.raises(RequestError) as e:
            parse_request(json.dumps(body).encode(), tasks, lim)
        assert e.value.status == 422 and e.value.field == "guidance_scale"
    one = parse_request(json.dumps({"task": "i2t", "input": png, "guidance_scale": 1}).encode(), ["i2t"], lim)
    assert one.opts.guidance_scale == 1.0  # 1 (no guidance) is fine for any task, as on the command line
    assert LumoConfig().generate.guidance_scale == 1.0
