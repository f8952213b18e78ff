"""An ONNX export of a token LM (`lumo export --format onnx`) standing in for the PyTorch model, so the
gates and evaluations that take `run.model` run on model.onnx or model.int8.onnx (onnxruntime, CPU).

It answers what they call: `model(input_ids=, attention_mask=, logits_to_keep=)` -> `.logits`, and
`model.generate(...)` with greedy selection over the given logits processors (the constraint and the
per-row sampler choose the token). The graph computes every position with no KV cache, so generation
re-reads the whole sequence each step: fine for checking an export, not a serving path.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


class OnnxLM:
    def __init__(self, path: str | Path, vocab: int, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads  # a fixed count keeps the logits bit-reproducible
        so.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.config = SimpleNamespace(vocab_size=int(vocab))
        self.device = torch.device("cpu")
        self.training = False

    def eval(self) -> "OnnxLM":
        return self

    def train(self, mode: bool = True) -> "OnnxLM":
        return self

    def parameters(self):
        yield torch.zeros(())  # where callers look for the device

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 logits_to_keep: torch.Tensor | int | None = None, **_) -> SimpleNamespace:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        feed = {"input_ids": input_ids.cpu().numpy().astype(np.int64), "attention_mask": mask.cpu().numpy().astype(np.int64)}
        logits = torch.from_numpy(self.session.run(None, feed)[0])
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep.cpu()]
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: list[int], pad_token_id: int, logits_processor=(), do_sample: bool = False,
                 **_) -> torch.Tensor:
        """transformers' greedy search: processors, argmax, a finished row gets pads; stops when every
        row has emitted an eos id or after max_new_tokens."""
        if do_sample:
            raise ValueError("OnnxLM.generate selects greedily: sampling is a logits processor (RowSampler)")
        ids, mask = input_ids.cpu(), attention_mask.cpu()
        stops = torch.as_tensor(list(eos_token_id))
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            scores = self(ids, mask, logits_to_keep=1).logits[:, -1].float()
            for proc in logits_processor:
                scores = proc(ids, scores)
            nxt = torch.where(done, torch.full_like(done, pad_token_id, dtype=torch.long), scores.argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
        return ids


def load_onnx_lm(path: str | Path, ts, threads: int = 1) -> OnnxLM:
    """model.onnx / model.int8.onnx of an export whose token_space.json is the run's token space."""
    from .token_space import TokenSpace

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no ONNX file there (lumo export --format onnx writes model.onnx)")
    space = p.parent / "token_space.json"
    if space.exists():
        ts.ensure_same(TokenSpace.load(space), what=f"{p.parent} export token space")
    return OnnxLM(p, ts.padded_size, threads)
