"""Held-out text perplexity of a base-LM run (`lumo eval perplexity`): the number `lumo train lm` reports
as its eval perplexity, on any text. The same mechanism as training's, not a copy: trainers/lm.py splits
its texts with `is_eval_text` and packs them with `pack` from here, and the number is the summed token
cross-entropy of every block over its target count, exp'd. Ray-free.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UserError

RUN_TODO = "give a `lumo train lm` run directory (config.yaml + export/)"
DATA_TODO = "give a text file (one text per line) or a manifest.jsonl (text.prompt / text.caption)"


def is_eval_text(text: str, eval_fraction: float) -> bool:
    """A text is held out when its sha256 falls under eval_fraction: stable whatever else the data holds."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction


def pack(texts: list[str], tok: Any, seq_len: int) -> torch.Tensor:
    """Concatenate text + eos and cut into [N, seq_len + 1] blocks (inputs and shifted targets); the tail
    that fills no block is dropped, and text shorter than one block is repeated to fill it."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_special_tokens=False) + [eos]
    n = len(ids) // (seq_len + 1)
    if n == 0:
        reps = (seq_len + 1) // max(1, len(ids)) + 1
        ids, n = ids * reps, 1
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def block_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """(summed cross-entropy in nats, target count) of the blocks' next-token predictions: each block's
    sum in float32 as training's eval takes it, the total in float64."""
    dev = getattr(model, "device", None) or next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for b0 in range(0, len(blocks), batch_size):
            b = blocks[b0: b0 + batch_size].to(dev)
            logits = model(input_ids=b[:, :-1]).logits.float()
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b[:, 1:], reduction="none")
            total += float(ce.sum(-1).double().sum())
            count += int(b[:, 1:].numel())
    return total, count


def text_perplexity(model: torch.nn.Module, tok: Any, texts: list[str], seq_len: int, batch_size: int = 8) -> dict:
    """Perplexity of the model on the texts, packed as training packs them."""
    blocks = pack(texts, tok, seq_len)
    total, count = block_nll(model, blocks, batch_size)
    loss = total / max(1, count)
    return {"perplexity": math.exp(min(loss, 50)), "eval_loss": loss, "tokens": count, "blocks": int(len(blocks)),
            "seq_len": int(seq_len), "texts": len(texts)}


def base_lm_dir(run: str) -> Path:
    """The local directory of a base-LM run (path or URI), or a UserError naming --run."""
    from ..generate_text import is_base_lm
    from ..storage import fetch_run, locate

    loc = locate(run)
    if not loc.exists():
        raise UserError("--run", run, "not found", RUN_TODO)
    d = fetch_run(run)
    if (d / "export" / "token_space.json").exists():
        raise UserError("--run", run, "a token-LM run (export/token_space.json): perplexity is of a base LM", RUN_TODO)
    if not is_base_lm(d) or not (d / "config.yaml").is_file():
        raise UserError("--run", run, "no config.yaml and export/config.json there: not a base-LM run", RUN_TODO)
    return d


def read_texts(data: str) -> list[str]:
    """The texts of a text file or manifest (lumo_ray.codecs.text.read_training_texts, as `lumo train lm`
    reads its inputs), or a UserError naming --data."""
    from ..codecs.text import read_training_texts
    from ..storage import locate

    if not locate(data).is_file():
        raise UserError("--data", data, "not found", DATA_TODO)
    texts = read_training_texts(data)  # a malformed manifest line: a TextDataError naming it
    return texts


def run_perplexity(run: str, data: str, split: str = "all", seq_len: Optional[int] = None, batch_size: int = 8,
                   device: str = "cpu", out: Optional[str] = None) -> dict:
    """`lumo eval perplexity`: the run's perplexity on the texts of `data` (split 'eval': only those the
    run's lm.eval_fraction holds out, as its training did), packed in blocks of lm.seq_len (or seq_len)
    with its export's tokenizer. The report ({perplexity, eval_loss, tokens, ...}) goes to `out` as JSON
    when given."""
    from ..codecs.text import TextDataError
    from ..config import LumoConfig, load_config
    from ..generate_text import load_base_lm
    from ..storage import locate, write_file

    if split not in ("all", "eval"):
        raise UserError("--split", None, f"{split!r} is not a split", "give all or eval")
    d = base_lm_dir(run)
    try:
        texts = read_texts(data)
    except TextDataError as e:
        if "no text" not in str(e):
            raise
        raise UserError("--data", data, "no text in it (an empty file, or no text.prompt / text.caption)",
                        DATA_TODO) from None
    cfg = load_config(LumoConfig, d / "config.yaml")
    if split == "eval":
        texts = [t for t in texts if is_eval_text(t, cfg.lm.eval_fraction)]
        if not texts:
            raise UserError("--data", data, f"none of its texts is in the run's eval split (lm.eval_fraction "
                            f"{cfg.lm.eval_fraction})", "give --split all")
    n = int(seq_len if seq_len is not None else cfg.lm.seq_len)
    for flag, v in (("--seq-len", n), ("--batch-size", batch_size)):
        if v < 1:
            raise UserError(flag, None, f"must be >= 1, got {v}")
    model, text = load_base_lm(d / "export", device)
    rep = {"run": str(locate(run)), "data": str(locate(data)), "split": split,
           **text_perplexity(model, text.tokenizer, texts, n, batch_size)}
    if out:
        write_file(out, json.dumps(rep, indent=2) + "\n")
    return rep
