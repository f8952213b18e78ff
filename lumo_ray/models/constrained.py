"""Constrained decoding of one target span (the decode compliance gate, docs/gates.md) as a transformers LogitsProcessor.

After the prompt (which ends with the span's opening token, e.g. <|img_start|>), generation step s
may only emit:
  image  s < N: an IMAGE id;                        s == N: the end token (<|img_end|>)
  audio  s < N: an id of codebook s mod K (N = frames x K, so phase is right by construction);
         s == N: <|aud_end|>
  text   s == 0: a TEXT id; 0 < s < N: a TEXT id or <|text_end|>; s == N: <|text_end|>
and once a row has emitted its end token only the pad token (generation stops there anyway). A text
span also stops at the text tokenizer's EOS (`stop_ids`): the constraint does not hide a model that
ends its caption with EOS instead of <|text_end|>, the decode check counts that span as not closed.
Media ids, specials other than the end token and padded embedding rows are never allowed in text.
`SpanConstraint(..., enabled=False)` leaves the scores alone, to measure what the constraint prevents.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from ..token_space import TokenSpace, TokenSpaceError

END = {"image": "<|img_end|>", "audio": "<|aud_end|>", "text": "<|text_end|>"}


@dataclass(frozen=True)
class SpanSpec:
    """What one generated span must look like."""
    modality: str
    """'image', 'audio' or 'text'."""
    length: int
    """Exact number of media ids (image, audio) or the maximum number of text ids."""
    start_id: int
    """The token the prompt must end with (the span's opening delimiter)."""
    end_id: int
    """The token that closes the span."""
    stop_ids: tuple[int, ...] = ()
    """Other ids that end a row without closing the span (text: the tokenizer's EOS)."""

    @property
    def terminators(self) -> list[int]:
        return [self.end_id, *self.stop_ids]

    @property
    def max_new_tokens(self) -> int:
        return self.length + 1


def span_spec(ts: TokenSpace, modality: str, length: int, start_id: int, stop_ids: tuple[int, ...] = ()) -> SpanSpec:
    if modality not in END:
        raise ValueError(f"unknown span modality {modality!r}: image, audio or text")
    if length < 1:
        raise ValueError(f"{modality} span length must be >= 1, got {length}")
    if modality == "audio" and length % ts.num_codebooks:
        raise TokenSpaceError(f"audio span length {length} is not a multiple of {ts.num_codebooks} codebooks")
    return SpanSpec(modality, int(length), int(start_id), ts.special_id(END[modality]), tuple(int(i) for i in stop_ids))


class SpanConstraint(LogitsProcessor):
    """Masks every id the span grammar forbids at the current step (see module docstring).

    prompt_len: the (left-padded) prompt length of the batch, so step = input_ids.shape[1] - prompt_len.
    vocab: width of the model's scores (the padded embedding size, or more)."""

    def __init__(self, ts: TokenSpace, spec: SpanSpec, prompt_len: int, pad_id: int, vocab: int,
                 enabled: bool = True):
        self.ts, self.spec, self.prompt_len, self.pad_id, self.enabled = ts, spec, int(prompt_len), int(pad_id), enabled
        if vocab < ts.total:
            raise TokenSpaceError(f"model scores have {vocab} columns, fewer than the token space's {ts.total} ids")
        self.vocab = int(vocab)

        def mask(*ranges: tuple[int, int]) -> torch.Tensor:
            m = torch.zeros(self.vocab, dtype=torch.bool)
            for a, b in ranges:
                m[a:b] = True
            return m

        end = (spec.end_id, spec.end_id + 1)
        self._end, self._pad = mask(end), mask((self.pad_id, self.pad_id + 1))
        if spec.modality == "image":
            r = ts.range("IMAGE")
            self._body = [mask((r.start, r.stop))]
        elif spec.modality == "audio":
            self._body = [mask((r.start, r.stop)) for r in ts.audio_ranges]
        else:
            t = ts.range("TEXT")
            self._text, self._text_or_end = mask((t.start, t.stop)), mask((t.start, t.stop), end)

    def allowed(self, step: int, finished: bool = False) -> torch.Tensor:
        """Bool [vocab]: the ids allowed at generation step `step` (0 = first generated token)."""
        s, n = self.spec, self.spec.length
        if finished or step > n:
            return self._pad
        if step == n:
            return self._end
        if s.modality == "image":
            return self._body[0]
        if s.modality == "audio":
            return self._body[step % len(self._body)]
        return self._text if step == 0 else self._text_or_end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.enabled:
            return scores
        step = input_ids.shape[1] - self.prompt_len
        gen = input_ids[:, self.prompt_len:]
        stops = torch.as_tensor(self.spec.terminators, device=gen.device)
        finished = torch.isin(gen, stops).any(1).tolist() if step > 0 else [False] * input_ids.shape[0]
        rows = torch.stack([self.allowed(step, f) for f in finished]).to(scores.device)
        if rows.shape[1] < scores.shape[1]:
            rows = torch.nn.functional.pad(rows, (0, scores.shape[1] - rows.shape[1]), value=False)
        return scores.masked_fill(~rows[:, : scores.shape[1]], float("-inf"))
