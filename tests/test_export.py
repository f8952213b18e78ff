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
from test_generate_decode import make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny token-LM run with its text tokenizer in export/, as the trainer writes it."""
    from lumo_ray.config import LumoConfig, load_config
    from lumo_ray.uti import build_adapters

    d = make_tiny_run(tmp_path_factory.mktemp("export") / "run")
    build_adapters(load_config(LumoConfig).uti).text.tokenizer.save_pretrained(str(d / "export"))
    return d


def _lumo(*args):
    return subprocess.run([sys.executable, "-m", "lumo_ray.cli", "export", *args], capture_output=True, text=True,
                          timeout=600)


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


def test_onnx_parity_and_int8(run, tmp_path):
    import onnxruntime as ort

    from lumo_ray.export import PARITY, _golden_batch

    p = _lumo("--run", str(run), "--format", "onnx", "--quantize", "int8", "--out", str(tmp_path / "onnx"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "WARNING" not in p.stdout + p.stderr and "Traceback" not in p.stderr
    rep = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert rep["max_abs_logit_diff"] <= PARITY == 1e-4 and rep["prompts"] == 16
    # checked again here, on the left-padded golden batch, by onnxruntime alone
    r = load_run(run)
    ids, mask = _golden_batch(r)
    assert (mask == 0).any()  # prompts of different lengths: the padding is exercised
    got = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx")).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = r.model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    assert np.abs(got - ref)[mask.astype(bool)].max() <= PARITY
    q = rep["int8"]
    assert q["size_ratio"] < 0.5 and q["argmax_agreement"] > 0.8 and q["max_abs_logit_diff"] > rep["max_abs_logit_diff"]
    assert (tmp_path / "onnx" / "token_space.json").exists() and (tmp_path / "onnx" / "tokenizer.json").exists()


def test_export_refuses_what_it_cannot_do(run, tmp_path):
    p = _lumo("--run", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "no config.yaml and export/token_space.json" in p.stderr
    p = _lumo("--run", str(run), "--format", "hf", "--quantize", "int8", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "applies to --format onnx only" in p.stderr
