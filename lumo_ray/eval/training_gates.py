"""The training steps' pass rules (a finite loss proves nothing): the base LM must beat a unigram model
of its own train tokens by a wide margin (templated captions: word order carries most of the signal),
and the token LM must improve on its warm start by 0.1 nats per target token on every task."""
from __future__ import annotations

BASE_LM_PPL_RATIO = 0.5
TOKEN_LM_MIN_GAIN = 0.1


def base_lm_verdict(m: dict) -> bool:
    """metrics.json of `lumo train lm`: eval perplexity <= BASE_LM_PPL_RATIO x the unigram perplexity."""
    return bool(m["perplexity"] <= BASE_LM_PPL_RATIO * m["unigram_perplexity"])


def token_lm_verdict(m: dict) -> bool:
    """metrics.json of a token-LM run: eval loss at least TOKEN_LM_MIN_GAIN below the warm start's and
    every task's eval loss below its warm-start value (stage 4 starts some tasks from scratch)."""
    start = m["eval_at_start"]
    return bool(m["eval_loss"] <= start["eval_loss"] - TOKEN_LM_MIN_GAIN
                and all(m["eval"][t] < start[f"eval_{t}"] for t in m["eval"]))
