"""Stage 3.4: constrained decoding, generation to files, and the decode-compliance gate."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from lumo_ray.config import LumoConfig, dump_config, load_config
from lumo_ray.eval.gates import check_generations, golden_set, run_decode_gate, summarize
from lumo_ray.generate import (GenOptions, build_prompt, generate, generate_spans, load_run, require_same_space,
                               row_seed, task_spec)
from lumo_ray.integrity import write_manifest
from lumo_ray.models.base_lm import build_base_lm
from lumo_ray.models.constrained import SpanConstraint
from lumo_ray.token_space import TokenSpaceError
from lumo_ray.uti import load_token_space


def make_tiny_run(root):
    """An untrained token LM run: random-init Qwen3 with the token space's padded vocab."""
    cfg = load_config(LumoConfig)
    ts = load_token_space(cfg.uti)
    model = build_base_lm("tiny", ts.padded_size, seed=0)
    model.save_pretrained(str(root / "export"))
    ts.save(root / "export")
    write_manifest(root / "export")  # as the trainer's export ends (loaders verify it)
    dump_config(cfg, root)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load_run(make_tiny_run(tmp_path_factory.mktemp("tokenlm_run")))


def _set(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask).flatten().tolist())


def test_processor_allowed_set_at_every_position(run):
    ts, opts = run.ts, GenOptions()
    vocab = ts.padded_size + 64  # extra columns stand for padded embedding rows: never allowed
    img, text = ts.range("IMAGE"), ts.range("TEXT")
    pad = run.builder.pad_id
    for task in ("t2i", "t2a", "i2t", "a2t"):
        spec = task_spec(run, task, opts)
        proc = SpanConstraint(ts, spec, prompt_len=5, pad_id=pad, vocab=vocab)
        for step in range(spec.length + 3):
            got = _set(proc.allowed(step))
            if step > spec.length:
                want = {pad}
            elif step == spec.length:
                want = {spec.end_id}
            elif task == "t2i":
                want = set(range(img.start, img.stop))
            elif task == "t2a":
                r = ts.audio_ranges[step % ts.num_codebooks]  # codebook phase by construction
                want = set(range(r.start, r.stop))
            else:
                want = set(range(text.start, text.stop)) | ({spec.end_id} if step > 0 else set())
            assert got == want, (task, step)
            assert _set(proc.allowed(step, finished=True)) == {pad}
    spec = task_spec(run, "t2i", opts)
    assert spec.length == run.adapters.image.tokens_per_image
    aspec = task_spec(run, "t2a", opts)
    assert aspec.length == min(run.adapters.audio.max_frames,
                               run.cfg.token_lm.seq.max_audio_tokens // ts.num_codebooks) * ts.num_codebooks


def test_processor_masks_scores_and_can_be_turned_off(run):
    ts = run.ts
    spec = task_spec(run, "t2a", GenOptions())
    scores = torch.randn(3, ts.padded_size)
    ids = torch.zeros(3, 7, dtype=torch.long)  # prompt of 4, three generated: step 3 -> codebook 3 mod K
    proc = SpanConstraint(ts, spec, prompt_len=4, pad_id=run.builder.pad_id, vocab=ts.padded_size)
    out = proc(ids, scores.clone())
    r = ts.audio_ranges[3 % ts.num_codebooks]
    assert torch.isfinite(out[:, r.start:r.stop]).all()
    assert torch.isinf(out[:, :r.start]).all() and torch.isinf(out[:, r.stop:]).all()
    off = SpanConstraint(ts, spec, prompt_len=4, pad_id=run.builder.pad_id, vocab=ts.padded_size, enabled=False)
    assert torch.equal(off(ids, scores.clone()), scores)


def test_constrained_media_spans_comply_untrained_but_captions_must_end(run, tmp_path):
    """The constraint makes an untrained model's media spans well-formed (grammar by construction), but
    not its captions: it never learned to close them with <|text_end|>, so i2t / a2t fail the gate."""
    rep = run_decode_gate(run, tmp_path / "gate", n=8, log=lambda *a: None)
    assert rep["token_space"]["match"] and not rep["pass"]
    assert set(rep["constrained"]) == {"t2i", "t2a", "i2t", "a2t"}
    for task in ("t2i", "t2a"):
        m = rep["constrained"][task]
        assert m["pass"] and m["compliant"] == 1.0 and m["out_of_range_ids"] == 0 and m["phase_errors"] == 0, task
        assert rep["unconstrained"][task]["compliant"] < 1.0  # without the constraint the media spans break
    for task in ("i2t", "a2t"):
        m = rep["constrained"][task]
        assert not m["pass"] and m["compliant"] < 1.0 and m["out_of_range_ids"] == 0, task
        assert any("cap" in e or "stop token" in e for e in m["errors"]), m["errors"]
    saved = json.loads((tmp_path / "gate" / "report.json").read_text())
    assert saved["pass"] is False and "unconstrained" in saved
    md = (tmp_path / "gate" / "report.md").read_text()
    assert "<img src=\"samples/t2i/" in md and "<audio controls src=\"samples/t2a/" in md


def test_generation_writes_png_wav_and_text(run, tmp_path):
    opts = GenOptions(seed=3)
    recs = generate(run, "t2i", tmp_path / "img", prompt="two red circles on the left", n=2, opts=opts,
                    log=lambda *a: None)
    assert all(r["ok"] for r in recs)
    im = Image.open(recs[0]["file"])
    s = run.adapters.image.image_size
    assert im.size == (s, s) and im.mode == "RGB"

    recs = generate(run, "t2a", tmp_path / "aud", prompt="three short high beeps", n=1, opts=opts,
                    log=lambda *a: None)
    wav, sr = sf.read(recs[0]["file"], always_2d=True)
    a = run.adapters.audio
    frames = task_spec(run, "t2a", opts).length // run.ts.num_codebooks
    assert sr == a.sample_rate and wav.shape[1] == a.channels
    assert wav.shape[0] == a.clip_frames(frames) * a.samples_per_frame

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "in.png")
    sf.write(str(tmp_path / "in.wav"), (0.3 * np.sin(np.arange(24000) / 10)).astype(np.float32), 24000)
    for task, src in (("i2t", "in.png"), ("a2t", "in.wav")):  # the untrained model's captions do not close
        recs = generate(run, task, tmp_path / task, input_path=tmp_path / src, n=2, opts=opts, log=lambda *a: None)
        assert open(recs[0]["file"], encoding="utf-8").read().rstrip("\n") == recs[0]["text"]
        lines = (tmp_path / task / "generations.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all("well_formed" in json.loads(x)["check"] for x in lines)


def test_generation_is_deterministic_for_a_seed(run):
    p = build_prompt(run, "t2i", caption="one blue square at the top")
    a = generate_spans(run, "t2i", [p] * 3, GenOptions(seed=5, top_k=50, top_p=0.9, temperature=0.8))
    b = generate_spans(run, "t2i", [p] * 3, GenOptions(seed=5, top_k=50, top_p=0.9, temperature=0.8))
    c = generate_spans(run, "t2i", [p] * 3, GenOptions(seed=6, top_k=50, top_p=0.9, temperature=0.8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_a_rows_tokens_do_not_depend_on_its_batch(run):
    """Each row samples from its own generator (row_seed(seed, i)): the same prompt and seed give the
    same tokens alone, beside other prompts, and at any batch_size (what lets `lumo serve` batch
    requests). With one generator for the batch, the first row's draws would shift with the rest."""
    ps = [build_prompt(run, "t2i", caption=c) for c in ("one red circle", "two green squares at the left", "blue")]
    opts = GenOptions(seed=9, top_k=40, temperature=0.9)
    alone = generate_spans(run, "t2i", ps[:1], opts)
    mixed = generate_spans(run, "t2i", ps, opts)
    assert np.array_equal(alone[0], mixed[0])
    assert all(np.array_equal(x, y) for x, y in zip(mixed, generate_spans(run, "t2i", ps, replace(opts, batch_size=1))))
    moved = generate_spans(run, "t2i", ps[::-1], opts, seeds=[row_seed(9, 2), row_seed(9, 1), row_seed(9, 0)])
    assert all(np.array_equal(x, y) for x, y in zip(mixed, moved[::-1]))
    assert not np.array_equal(mixed[0], generate_spans(run, "t2i", ps[:1], opts, seeds=[row_seed(9, 1)])[0])


def test_gate_checker_fails_on_doctored_outputs(run):
    opts = GenOptions(seed=1)
    for task in ("t2a", "t2i"):
        gold = golden_set(run, task, 2, seed=0)
        prompts = [g["prompt"] for g in gold]
        good = generate_spans(run, task, prompts, opts)
        checks, _ = check_generations(run, task, prompts, good, opts)
        assert summarize(checks, "x")["pass"]
        body, end = good[0][:-1], good[0][-1:]
        doctored = {
            "wrong_length": np.concatenate([body[:-run.ts.num_codebooks], end]),
            "no_end_token": body,
            "foreign_id": np.concatenate([[run.ts.range("TEXT").start + 5], body[1:], end]),
            "after_end": np.concatenate([good[0], [body[0]]]),
        }
        if task == "t2a":  # swap two neighbours: every id stays an audio id, the phase breaks
            sw = body.copy()
            sw[0], sw[1] = sw[1], sw[0]
            doctored["wrong_phase"] = np.concatenate([sw, end])
        for what, g in doctored.items():
            checks, _ = check_generations(run, task, prompts[:1], [g], opts)
            m = summarize(checks, "x")
            assert not m["pass"], (task, what)
        c, _ = check_generations(run, task, prompts[:1], [doctored["wrong_length"]], opts)
        assert not c[0].exact_length and c[0].length == len(body) - run.ts.num_codebooks
        if task == "t2i":  # an image needs exactly tokens_per_image codes (a shorter clip still decodes)
            assert not c[0].decoded
        if task == "t2a":
            c, _ = check_generations(run, task, prompts[:1], [doctored["wrong_phase"]], opts)
            assert c[0].phase_errors == 2 and c[0].out_of_range == 0 and not c[0].decoded


def test_text_span_that_overruns_its_end_fails_the_gate(run):
    """A caption must close with <|text_end|>: one that ends with the tokenizer's EOS (generation stops
    there) or runs on to the token cap is not compliant, even though every id is a TEXT id."""
    opts = GenOptions(seed=1, max_text_tokens=12)
    spec = task_spec(run, "i2t", opts)
    eos, end = run.adapters.text.eos_id, spec.end_id
    assert spec.stop_ids == (eos,)
    prompts = [g["prompt"] for g in golden_set(run, "i2t", 1, seed=0)]
    words = np.asarray(run.adapters.text.encode("one blue circle in the center"), np.int64)
    cases = {"closed": (np.r_[words, end], True),
             "ended_by_eos": (np.r_[words, eos], False),  # the '... center medium<|endoftext|>'
             "through_eos_to_cap": (np.r_[np.resize(np.r_[words, eos], 12), end], False),
             "at_the_cap": (np.r_[np.resize(words, 12), end], False)}
    for what, (g, ok) in cases.items():
        checks, _ = check_generations(run, "i2t", prompts, [g], opts)
        assert summarize(checks, "text")["pass"] == ok, (what, checks[0])
    c, _ = check_generations(run, "i2t", prompts, [cases["ended_by_eos"][0]], opts)
    assert not c[0].well_formed and "stop token" in c[0].error
    c, _ = check_generations(run, "i2t", prompts, [cases["at_the_cap"][0]], opts)
    assert c[0].well_formed and not c[0].exact_length and "cap" in c[0].error
    # generation itself stops at EOS: an untrained model's spans never carry anything after a terminator
    for g in generate_spans(run, "i2t", prompts * 4, GenOptions(seed=3, max_text_tokens=12, constrained=False)):
        hits = np.nonzero(np.isin(g, [end, eos]))[0]
        assert hits.size <= 1 and (hits.size == 0 or hits[0] == len(g) - 1)


def test_token_space_mismatch_fails_gate_and_refuses_generation(run, tmp_path):
    cfg = load_config(LumoConfig, run.dir / "config.yaml", ["uti.image.seed=1"])  # another image codec identity
    other = load_run(run.dir, cfg=cfg)
    assert not other.hash_match
    with pytest.raises(TokenSpaceError, match="differs"):
        require_same_space(other)
    rep = run_decode_gate(other, tmp_path / "g", n=1, tasks=["t2i"], log=lambda *a: None)
    assert rep["pass"] is False and rep["constrained"]["t2i"]["pass"]


def test_cli_gate_decode_exit_status(run, tmp_path, capsys):
    from lumo_ray.cli import gen as cli_gen

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--config")
        q.add_argument("--set", action="append", default=[])
        q.add_argument("--address")

    cli_gen.add_commands(sub, common)
    args = p.parse_args(["gate", "decode", "--run", str(run.dir), "--out", str(tmp_path / "g"), "--n", "2",
                         "--task", "t2i"])
    assert args.func(args) == 0
    assert "decode compliance PASS" in capsys.readouterr().out
    args = p.parse_args(["gate", "decode", "--run", str(run.dir), "--out", str(tmp_path / "g2"), "--n", "2",
                         "--task", "i2t"])  # untrained captions never reach <|text_end|>
    assert args.func(args) == 1
    assert "decode compliance FAIL" in capsys.readouterr().out
    args = p.parse_args(["generate", "--run", str(run.dir), "--task", "t2i", "--prompt", "one red circle",
                         "--out", str(tmp_path / "o"), "--n", "1", "--seed", "2"])
    assert args.func(args) == 0 and (tmp_path / "o" / "t2i-000.png").exists()


def test_cli_token_space_mismatch_names_the_override(run, tmp_path, capsys):
    from lumo_ray.cli import main

    rc = main(["generate", "--run", str(run.dir), "--task", "t2a", "--prompt", "a beep", "--out", str(tmp_path / "g"),
               "--set", "uti.audio.bandwidth=3.0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: token space ({run.dir})") and "the run's config.yaml + --set uti.audio.bandwidth=3.0" in err
    assert "first differing field: adapters.audio.bandwidth" in err and "drop the override" in err
