"""The text path of the base LM (the OpenLLM path): `lumo eval perplexity` on held-out text, the number
training reports; `lumo generate --task t2t` on a base-LM run and on a token-LM run, deterministic for
a seed; the server's per-task path answering t2t."""
from __future__ import annotations

import json

import pytest
import torch

from lumo_ray.cli import main
from lumo_ray.codecs.text import TINY_CORPUS, read_training_texts
from lumo_ray.config import LumoConfig, ServeConfig, dump_config, load_config
from lumo_ray.eval.perplexity import is_eval_text, text_perplexity
from lumo_ray.generate import GenOptions, generate, generate_spans, load_run, text_prompt
from lumo_ray.generate_text import TextDeltas, finish_text
from lumo_ray.models.base_lm import build_base_lm
from lumo_ray.serving import model_info, parse_request, respond_batch, served_tasks

from test_generate_decode import make_tiny_run

LM = ["lm.train.steps=40", "lm.train.eval_every=40", "lm.train.ckpt_every=1000", "lm.train.log_every=1000",
      "lm.seq_len=32", "lm.train.global_batch=8", "lm.eval_fraction=0.2"]
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A base LM trained 40 steps on the tiny corpus, by the trainer's own loop in this process."""
    from trainers.context import LocalContext
    from trainers.lm import lm_loop

    out = tmp_path_factory.mktemp("text_path") / "lm"
    cfg = load_config(LumoConfig, None, [*LM, f"lm.out={out}"])
    cfg.lm.inputs = [str(TINY_CORPUS)]
    dump_config(cfg, out)  # as run_lm does: the run's config.yaml
    m = lm_loop(cfg, LocalContext(), log=lambda *a, **k: None)
    held_out = [t for t in read_training_texts(TINY_CORPUS) if is_eval_text(t, 0.2)]
    return {"dir": out, "cfg": cfg, "metrics": m, "held_out": held_out}


def test_trained_base_lm_beats_its_untrained_init_on_held_out_text(base):
    run = load_run(base["dir"])
    tok = run.adapters.text.tokenizer
    init = build_base_lm("tiny", len(tok), seed=base["cfg"].lm.train.seed, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id)
    trained = text_perplexity(run.model, tok, base["held_out"], 32)
    untrained = text_perplexity(init, tok, base["held_out"], 32)
    assert trained["tokens"] == untrained["tokens"] > 0
    assert untrained["perplexity"] > 0.8 * len(tok)  # a random init is about uniform over the vocabulary
    assert trained["perplexity"] < 0.5 * untrained["perplexity"]


def test_eval_perplexity_cli_is_the_training_eval_number(base, tmp_path, capsys):
    want = base["metrics"]["perplexity"]
    held = tmp_path / "held_out.txt"
    held.write_text("\n".join(base["held_out"]) + "\n")
    assert main(["eval", "perplexity", "--run", str(base["dir"]), "--data", str(held), "--out",
                 str(tmp_path / "ppl.json")]) == 0
    rep = json.loads((tmp_path / "ppl.json").read_text())
    assert rep["perplexity"] == pytest.approx(want, rel=1e-5)
    assert rep["eval_loss"] == pytest.approx(base["metrics"]["eval_loss"], rel=1e-5)
    assert rep["tokens"] == rep["blocks"] * 32 > 0 and rep["texts"] == len(base["held_out"])
    assert f"perplexity {want:.4f}" in capsys.readouterr().out
    # the run's own eval split of its training input: the same number, printed as JSON without --out
    assert main(["eval", "perplexity", "--run", str(base["dir"]), "--data", str(TINY_CORPUS), "--split", "eval"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["perplexity"] == pytest.approx(want, rel=1e-5) and printed["tokens"] == rep["tokens"]


def test_eval_perplexity_refuses_bad_input_in_one_line(base, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    tlm = make_tiny_run(tmp_path / "tlm")
    cases = [(["--run", str(base["dir"]), "--data", str(tmp_path / "missing.txt")], "--data", "not found"),
             (["--run", str(base["dir"]), "--data", str(empty)], "--data", "no text"),
             (["--run", str(tlm), "--data", str(TINY_CORPUS)], "--run", "a token-LM run"),
             (["--run", str(tmp_path), "--data", str(TINY_CORPUS)], "--run", "not a base-LM run")]
    for argv, field, why in cases:
        assert main(["eval", "perplexity", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {field}") and why in err, err


def _t2t(run_dir, out, seed, *extra) -> list[dict]:
    assert main(["generate", "--run", str(run_dir), "--task", "t2t", "--prompt", PROMPT, "--n", "2",
                 "--seed", str(seed), "--max-new-tokens", "12", "--out", str(out), *extra]) == 0
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_t2t_on_a_base_lm_is_deterministic_for_a_seed(base, tmp_path):
    a, b, c = (_t2t(base["dir"], tmp_path / k, s) for k, s in (("a", 3), ("b", 3), ("c", 4)))
    for k in ("t2t-000.txt", "t2t-001.txt", "options.json"):
        assert (tmp_path / "a" / k).read_bytes() == (tmp_path / "b" / k).read_bytes()
    assert [{**r, "file": None} for r in a] == [{**r, "file": None} for r in b]  # (the files' paths differ)
    assert [r["ids"] for r in a] != [r["ids"] for r in c]
    assert a[0]["ids"] != a[1]["ids"]  # each sample its own generator
    run = load_run(base["dir"])
    vocab = len(run.adapters.text.tokenizer)
    for r in a:
        assert r["ok"] and r["finish_reason"] in ("stop", "length") and all(0 <= i < vocab for i in r["ids"])
        assert r["text"] == run.adapters.text.decode(r["ids"][:-1] if r["ids"][-1] == 0 else r["ids"])
        assert len(r["ids"]) <= 12 and (r["finish_reason"] == "length") == (len(r["ids"]) == 12 and r["ids"][-1] != 0)


def test_t2t_stop_strings_cut_the_text_and_streaming_adds_up(base, tmp_path):
    run = load_run(base["dir"])
    (full,) = generate(run, "t2t", tmp_path / "full", prompt=PROMPT, opts=GenOptions(seed=5, max_text_tokens=24),
                       log=lambda *a: None)
    text = full["text"]
    assert len(text) > 4, full
    stop = text[2:4]  # a stop string inside the text: it and what follows are cut
    opts = GenOptions(seed=5, max_text_tokens=24, stop=[stop])
    (cut,) = generate(run, "t2t", tmp_path / "cut", prompt=PROMPT, opts=opts, log=lambda *a: None)
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    assert cut["ids"] == full["ids"][: len(cut["ids"])]  # the same draws up to the stop
    # on_token sees each token as it is chosen; the text deltas join to the final text
    seen: list[tuple[int, int]] = []
    deltas = TextDeltas(run.adapters.text.decode, run.adapters.text.eos_id, opts.stop)
    pieces = []

    def on_token(row, tok):
        seen.append((row, tok))
        pieces.append(deltas.push(tok))

    (ids,) = generate_spans(run, "t2t", [text_prompt(run, PROMPT)], opts, on_token=on_token)
    pieces.append(deltas.finish())
    assert [t for _, t in seen] == ids.tolist() == cut["ids"] and {r for r, _ in seen} == {0}
    assert "".join(pieces) == cut["text"] == finish_text(ids, run.adapters.text.decode, 0, opts.stop)[0]


def test_t2t_on_a_token_lm_run_samples_only_text_ids(tmp_path):
    run = load_run(make_tiny_run(tmp_path / "tlm"))
    assert run.kind == "token-lm" and "t2t" in served_tasks(run)
    a = _t2t(run.dir, tmp_path / "a", 1)
    b = _t2t(run.dir, tmp_path / "b", 1)
    assert [{**r, "file": None} for r in a] == [{**r, "file": None} for r in b]
    text = run.ts.range("TEXT")
    for r in a:  # an untrained model over the whole vocabulary: only the text part is ever drawn
        assert r["ok"] and len(r["ids"]) > 0 and all(text.start <= i < text.stop for i in r["ids"])
    # the prompt is plain text tokens, no delimiters
    assert text_prompt(run, PROMPT).tolist() == run.adapters.text.encode(PROMPT)


def test_the_server_path_answers_t2t_on_a_base_lm_run(base, tmp_path):
    run = load_run(base["dir"])
    limits = ServeConfig()
    assert served_tasks(run) == ["t2t"]
    info = model_info(run, served_tasks(run), limits)
    assert info["kind"] == "base-lm" and info["token_space_hash"] is None and info["limits"]["max_len"] == 32
    req = parse_request(json.dumps({"task": "t2t", "prompt": PROMPT, "seed": 3, "n": 2,
                                    "max_new_tokens": 12}).encode(), served_tasks(run), limits)
    (ans,) = respond_batch(run, [req], limits)
    ref = _t2t(base["dir"], tmp_path / "cli", 3)  # `lumo generate`'s samples for the same seed
    assert [r["ids"] for r in ans["results"]] == [r["ids"] for r in ref]
    assert [r["text"] for r in ans["results"]] == [r["text"] for r in ref]
    assert all(r["finish_reason"] == x["finish_reason"] for r, x in zip(ans["results"], ref))
    long = parse_request(json.dumps({"task": "t2t", "prompt": PROMPT * 3, "max_new_tokens": 30}).encode(),
                         ["t2t"], limits)
    (refused,) = respond_batch(run, [long], limits)
    assert refused.status == 422 and "lm.seq_len of 32" in refused.message
    assert main(["generate", "--run", str(base["dir"]), "--task", "t2i", "--prompt", PROMPT,
                 "--out", str(tmp_path / "x")]) == 2  # a base LM has no media
