"""`lumo export`: a trained token LM (3.3 or stage 4) for use outside lumo_ray (library, no Ray).

- `hf`: the run's export/ as a Hugging Face directory (LoRA already merged by the trainer), with its
  tokenizer and token_space.json; checked to load with `AutoModelForCausalLM.from_pretrained` and
  `AutoTokenizer.from_pretrained` alone and to give the run's logits.
- `onnx`: model.onnx (input_ids, attention_mask -> logits; batch and length dynamic) beside the tokenizer
  and token_space.json, checked in onnxruntime against PyTorch on the run's golden prompts, left-padded
  in one batch: the largest |logit difference| must be <= PARITY. `--quantize int8` adds
  model.int8.onnx (onnxruntime dynamic int8 weights) with its size, latency and logit difference, and
  the eval-split target loss of PyTorch, ONNX and int8 (the gates run on an export with `--onnx`).
export.json says what was checked and measured.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .integrity import write_manifest
from .storage import write_file

PARITY = 1e-4
OPSET = 17


def _golden_batch(run, per_task: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The run's golden prompts (eval/gates.golden_set), left-padded into one batch, and its mask."""
    from .eval.gates import available_tasks, golden_set

    prompts = [g["prompt"] for t in available_tasks(run) for g in golden_set(run, t, per_task, seed=0)]
    n = max(len(p) for p in prompts)
    ids = np.full((len(prompts), n), run.builder.pad_id, np.int64)
    mask = np.zeros((len(prompts), n), np.int64)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left- or right-) padded batch, as transformers' generate computes them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


class _Logits(torch.nn.Module):
    """What the ONNX graph computes: logits of every position, no cache; position ids from the mask,
    so a left-padded row reads as it does alone (the model's default, 0..n-1, would shift it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                          use_cache=False).logits


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())  # padded positions are not a prediction


def export_hf(run, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(run.dir / "export", out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()  # nothing of lumo_ray
    tok = AutoTokenizer.from_pretrained(str(out))
    ids, mask = _golden_batch(run)
    with torch.no_grad():
        got = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
        ref = run.model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    return {"format": "hf", "loads_with": "AutoModelForCausalLM / AutoTokenizer.from_pretrained",
            "tokenizer_vocab": len(tok), "max_abs_logit_diff": _max_diff(got, ref, mask), "prompts": int(len(ids))}


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _latency(fn, reps: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def export_onnx(run, out: Path, quantize: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    src = run.dir / "export"
    for f in src.iterdir():  # tokenizer, token space, lumo meta: everything but the weights
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            shutil.copy2(f, out / f.name)
    wrapped = _Logits(run.model).eval()
    ids, mask = _golden_batch(run)
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on data-dependent branches; parity below is the check
        torch.onnx.export(wrapped, (t_ids[:2], t_mask[:2]), str(out / "model.onnx"), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={k: {0: "batch", 1: "length"} for k in ("input_ids", "attention_mask", "logits")})
        ref = wrapped(t_ids, t_mask).numpy()
    sess = _session(out / "model.onnx")
    feed = {"input_ids": ids, "attention_mask": mask}
    got = sess.run(None, feed)[0]
    diff = _max_diff(got, ref, mask)
    if not diff <= PARITY:
        raise RuntimeError(f"ONNX parity: max |logit difference| {diff:.3g} on the golden prompts exceeds {PARITY}")
    rep = {"format": "onnx", "opset": OPSET, "prompts": int(len(ids)), "max_abs_logit_diff": diff, "parity_limit": PARITY,
           "bytes": (out / "model.onnx").stat().st_size, "latency_s": _latency(lambda: sess.run(None, feed))}
    if quantize == "int8":
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level, _ = root.level, root.setLevel(logging.ERROR)  # its advice to pre-process, logged on the root logger
        try:
            quantize_dynamic(str(out / "model.onnx"), str(out / "model.int8.onnx"), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        s8 = _session(out / "model.int8.onnx")
        q = s8.run(None, feed)[0]
        rep["int8"] = {"bytes": (out / "model.int8.onnx").stat().st_size,
                       "size_ratio": (out / "model.int8.onnx").stat().st_size / rep["bytes"],
                       "latency_s": _latency(lambda: s8.run(None, feed)), "max_abs_logit_diff": _max_diff(q, ref, mask),
                       "argmax_agreement": float((q.argmax(-1) == ref.argmax(-1))[mask.astype(bool)].mean())}
        rep["int8"]["latency_ratio"] = rep["int8"]["latency_s"] / rep["latency_s"]
        rep["eval_loss"] = eval_losses(run, out)
    return rep


def eval_losses(run, out: Path, max_samples: int = 256) -> dict:
    """Target loss on the eval split of the run's shards (token_lm.shards) for the PyTorch model, the
    ONNX graph and its int8 copy, and the int8 delta; skipped, with the reason, without those shards."""
    from .data.shard_reader import ShardDataset
    from .models.token_lm import task_loss_means, task_loss_sums
    from .onnx_lm import load_onnx_lm

    from .data.mix import primary

    shards = primary(run.cfg.token_lm.shards)  # a mix: its first source
    try:
        samples = list(ShardDataset(shards, "eval", shuffle=False, expected=run.ts))[:max_samples]
    except Exception as e:  # the export stands without them: say why there is no number
        return {"skipped": f"no eval split in token_lm.shards {shards!r}: {type(e).__name__}: {e}"}
    if not samples:
        return {"skipped": f"the eval split of token_lm.shards {shards!r} is empty"}
    losses = {name: task_loss_means(task_loss_sums(model, run.builder, samples))["all"] for name, model in
              (("pytorch", run.model), ("onnx", load_onnx_lm(out / "model.onnx", run.ts)),
               ("int8", load_onnx_lm(out / "model.int8.onnx", run.ts)))}
    return {"shards": str(shards), "samples": len(samples), **losses, "int8_delta": losses["int8"] - losses["pytorch"]}


def export_run(run_dir: str, fmt: str, out_dir: str | Path, quantize: str | None = None) -> dict:
    """Export a token-LM / stage-4 run; writes export.json beside the files and returns it."""
    from .generate import load_run, require_same_space

    if fmt not in ("hf", "onnx"):
        raise ValueError(f"--format {fmt!r}: hf or onnx")
    if quantize not in (None, "int8") or (quantize and fmt != "onnx"):
        raise ValueError("--quantize int8 applies to --format onnx only")
    run = load_run(run_dir)
    require_same_space(run)
    out = Path(out_dir)
    with torch.no_grad():
        rep = export_hf(run, out) if fmt == "hf" else export_onnx(run, out, quantize)
    rep.update(run=run.name, token_space_hash=run.ts.hash)
    write_file(out / "export.json", json.dumps(rep, indent=2) + "\n")
    write_manifest(out)  # last: the digests of the exported folder (lumo_ray/integrity.py)
    return rep
