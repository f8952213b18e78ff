"""`lumo export`: a token-LM run as a Hugging Face directory that loads with transformers alone, and as
ONNX whose logits match PyTorch's within 1e-4 in onnxruntime (plus a dynamic-int8 copy)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lumo_ray.generate import load_run
from lumo_ray.integrity import write_manifest
from test_generate_decode import make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny token-LM run with its text tokenizer in export/, as the trainer writes it."""
    from lumo_ray.config import LumoConfig, load_config
    from lumo_ray.uti import build_adapters

    d = make_tiny_run(tmp_path_factory.mktemp("export") / "run")
    build_adapters(load_config(LumoConfig).uti).text.tokenizer.save_pretrained(str(d / "export"))
    write_manifest(d / "export")
    return d


def _lumo(*args):
    return subprocess.run([sys.executable, "-m", "lumo_ray.cli", "export", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def onnx_int8(run, tmp_path_factory):
    """`lumo export --format onnx --quantize int8`: model.onnx (what a plain onnx export writes; int8 only
    adds model.int8.onnx and its numbers) and the int8 copy, which both ONNX tests read. (dir, process)"""
    out = tmp_path_factory.mktemp("onnx_int8") / "onnx"
    return out, _lumo("--run", str(run), "--format", "onnx", "--quantize", "int8", "--out", str(out))


def test_hf_export_loads_with_transformers_alone(run, tmp_path):
    p = _lumo("--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr[-3000:]
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "ids = torch.tensor([t.encode('two red circles')]); print(m(input_ids=ids).logits[0, -1, :5].tolist())")
    alone = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]  # a process that never imports lumo_ray
    r = load_run(run)
    ids = torch.tensor([r.adapters.text.encode("two red circles")])
    want = r.model(input_ids=ids).logits[0, -1, :5].tolist()
    assert np.allclose(json.loads(alone.stdout), want, atol=1e-5)
    rep = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert rep["max_abs_logit_diff"] == 0.0 and (tmp_path / "hf" / "token_space.json").exists()


def test_onnx_parity_and_int8(run, onnx_int8):
    import onnxruntime as ort

    from lumo_ray.export import PARITY, _golden_batch

    onnx, p = onnx_int8
    assert p.returncode == 0, p.stderr[-3000:]
    assert "WARNING" not in p.stdout + p.stderr and "Traceback" not in p.stderr
    rep = json.loads((onnx / "export.json").read_text())
    assert rep["max_abs_logit_diff"] <= PARITY == 1e-4 and rep["prompts"] == 16
    # checked again here, on the left-padded golden batch, by onnxruntime alone
    r = load_run(run)
    ids, mask = _golden_batch(r)
    assert (mask == 0).any()  # prompts of different lengths: the padding is exercised
    got = ort.InferenceSession(str(onnx / "model.onnx")).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = r.model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    assert np.abs(got - ref)[mask.astype(bool)].max() <= PARITY
    q = rep["int8"]
    assert q["size_ratio"] < 0.5 and q["argmax_agreement"] > 0.8 and q["max_abs_logit_diff"] > rep["max_abs_logit_diff"]
    assert (onnx / "token_space.json").exists() and (onnx / "tokenizer.json").exists()
    assert "skipped" in rep["eval_loss"]  # this run has no shards: said, not invented


class Script:
    """A logits processor that forces each row's tokens from a list (then -inf but the pad id), so a
    generation loop's stopping and padding can be compared without depending on logits."""

    def __init__(self, rows: list[list[int]], prompt_len: int, pad: int):
        self.rows, self.n, self.pad = rows, prompt_len, pad

    def __call__(self, ids, scores):
        out = torch.full_like(scores, float("-inf"))
        step = ids.shape[1] - self.n
        for i, r in enumerate(self.rows):
            out[i, r[step] if step < len(r) else self.pad] = 0.0
        return out


def test_onnx_lm_stands_in_for_the_pytorch_model(run, onnx_int8, tmp_path):
    """The ONNX export behind run.model (what `--onnx` does for the gates): target losses of a
    right-padded training batch equal PyTorch's within 1e-4, and its generation loop stops and pads as
    transformers' generate does."""
    from lumo_ray.data.sequences import Sequence, collate
    from lumo_ray.models.token_lm import target_losses
    from lumo_ray.onnx_lm import load_onnx_lm

    onnx, p = onnx_int8
    assert p.returncode == 0, p.stderr[-3000:]
    r = load_run(run)
    lm = load_onnx_lm(onnx / "model.onnx", r.ts)
    text = r.ts.range("TEXT")
    seqs = [Sequence(np.arange(text.start + 5, text.start + 5 + k), np.arange(text.start + 5, text.start + 5 + k), "t", str(k))
            for k in (9, 14, 6)]
    batch = collate(seqs, r.builder.pad_id)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        (a, n1), (b, n2) = target_losses(r.model, batch), target_losses(lm, batch)
    assert torch.equal(n1, n2) and torch.allclose(a, b, atol=1e-4)
    pad, end = r.builder.pad_id, text.start + 1
    prompt = torch.tensor([[pad, text.start + 7, text.start + 8], [text.start + 3, text.start + 7, text.start + 8]])
    mask = (prompt != pad).long()
    kw = dict(max_new_tokens=5, eos_token_id=[end], pad_token_id=pad)
    rows = [[text.start + 20, end], [text.start + 21, text.start + 22, text.start + 23, end]]
    want = r.model.generate(input_ids=prompt, attention_mask=mask, do_sample=False, logits_processor=[Script(rows, 3, pad)], **kw)
    got = lm.generate(input_ids=prompt, attention_mask=mask, logits_processor=[Script(rows, 3, pad)], **kw)
    assert torch.equal(got, want)
    gate = subprocess.run([sys.executable, "-m", "lumo_ray.cli", "gate", "decode", "--run", str(run), "--out",
                           str(tmp_path / "gate"), "--n", "2", "--task", "t2i", "--onnx", str(onnx / "model.onnx")],
                          capture_output=True, text=True, timeout=600)
    assert gate.returncode == 0 and "decode compliance PASS" in gate.stdout, gate.stdout[-2000:] + gate.stderr[-2000:]
    assert "onnxruntime" in (tmp_path / "gate" / "report.json").read_text()


def test_export_refuses_what_it_cannot_do(run, tmp_path):
    p = _lumo("--run", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "no config.yaml and export/token_space.json" in p.stderr
    p = _lumo("--run", str(run), "--format", "hf", "--quantize", "int8", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "applies to --format onnx only" in p.stderr
