"""t2t, text from text: on a base-LM run (`lumo train lm`: its export and the tokenizer saved with it)
or on a token-LM run (the TEXT part of its vocabulary: the prompt as plain text tokens, no delimiters;
special and media ids are never sampled).

One loop for both, the one `lumo generate --task t2t` and the server run (lumo_ray.generate dispatches
to it): left-padded rows with a KV cache, each row's next token picked by the caller's sampler (the row
sampler of lumo_ray.generate, one generator per row), a row ending at the tokenizer's end token, when
its text holds a stop string, or after max_new_tokens. `on_token(row, id)` sees every token as it is
chosen (streaming); TextDeltas turns one row's tokens into text deltas that add up to `finish_text`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

BASE_LM_TODO = "train or export it again (`lumo train lm` writes SHA256SUMS)"


def is_base_lm(run_dir: Path) -> bool:
    """A `lumo train lm` run: an HF export without the token space a token-LM export carries."""
    e = Path(run_dir) / "export"
    return (e / "config.json").is_file() and not (e / "token_space.json").exists()


def load_base_lm(export: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model, text adapter) of a base-LM export, verified against its SHA256SUMS first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .codecs.text import HFTextAdapter, tokenizer_digest
    from .integrity import verify

    d = Path(export)
    verify(d, "base-LM export", BASE_LM_TODO)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).to(device).eval()
    return model, HFTextAdapter(tok, f"export@{tokenizer_digest(tok)}")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, Optional[str]]:
    """The text before the earliest stop string (which is not kept, as OpenAI's `stop`), and that string."""
    hits = [(text.find(s), len(s), s) for s in stop if s and s in text]
    if not hits:
        return text, None
    i, _, s = min(hits)
    return text[:i], s


def finish_text(ids: Sequence[int], decode: Callable, eos: Optional[int], stop: Sequence[str]) -> tuple[str, str]:
    """(text, finish reason) of a row's generated ids: 'stop' when the end token or a stop string ended
    it, 'length' when max_new_tokens did."""
    ids = [int(i) for i in ids]
    ended = bool(ids) and eos is not None and ids[-1] == eos
    text, hit = cut_at_stop(decode(ids[:-1] if ended else ids), stop)
    return text, "stop" if ended or hit is not None else "length"


class TextDeltas:
    """One row's text while it streams: push(id) -> the text to send now ('' while waiting), finish() ->
    the rest when the row ran to max_new_tokens. The deltas add up to finish_text's text: the end token
    is not text, and a tail that may still become a stop string, or an incomplete multi-byte character
    (decoded as U+FFFD), waits for the next token."""

    def __init__(self, decode: Callable, eos: Optional[int], stop: Sequence[str] = ()):
        self.decode, self.eos, self.stop = decode, eos, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent, self.ended = "", False

    def push(self, token: int) -> str:
        if self.ended:
            return ""
        if self.eos is not None and int(token) == self.eos:
            return self.finish()
        self.ids.append(int(token))
        text, hit = cut_at_stop(self.decode(self.ids), self.stop)
        if hit is not None:
            self.ended = True
            return self._emit(text)
        keep = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:  # the longest tail that begins a stop string
            keep = max([keep] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
        return self._emit(text[: len(text) - keep])

    def finish(self) -> str:
        if self.ended:
            return ""
        self.ended = True
        return self._emit(cut_at_stop(self.decode(self.ids), self.stop)[0])

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):  # (a byte-level BPE decodes by concatenation: not reached)
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def text_loop(model, prompts: list[np.ndarray], pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
              vocab: int, constrained: bool, eos: Optional[int], pad: int, max_new_tokens: int,
              stop: Sequence[str] = (), decode: Optional[Callable] = None,
              on_token: Optional[Callable[[int, int], None]] = None) -> list[np.ndarray]:
    """Generated ids after each prompt: up to and including the end token, or the token that completed a
    stop string, or max_new_tokens of them. pick(seqs, scores) -> the next id of every row, from the
    float32 logits (columns from `vocab` on at -inf when constrained: only text ids). Finished rows are
    fed pads until every row has ended. on_token(row, id): each row's token as soon as it is chosen."""
    b, n = len(prompts), max(len(p) for p in prompts)
    if n == 0:
        raise ValueError("t2t needs a non-empty prompt")
    ids = torch.full((b, n), pad, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token sits at column n
        ids[i, n - len(p):] = torch.as_tensor(np.asarray(p, np.int64))
        mask[i, n - len(p):] = 1
    dev = getattr(model, "device", None) or next(model.parameters()).device
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens, as `generate` sets them
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    stop = [s for s in stop if s]
    gen: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    seqs = ids
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    for step in range(max_new_tokens):
        scores = out.logits[:, -1, :].float()
        if constrained:
            scores[:, vocab:] = float("-inf")
        nxt = pick(seqs, scores).to(dev)
        nxt = torch.where(torch.as_tensor(done, device=dev), torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            gen[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if t == eos or (stop and decode is not None and cut_at_stop(decode(gen[i]), stop)[1] is not None):
                done[i] = True
        if all(done) or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones((b, 1))], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
    return [np.asarray(g, np.int64) for g in gen]
