"""The demo's training verdicts mean something: a finite loss is not a pass. The base LM must beat a
unigram model of its train tokens, a token LM must improve on its warm start (every task)."""
import pytest
import torch

from lumo_ray.eval.training_gates import BASE_LM_PPL_RATIO, base_lm_verdict, token_lm_verdict
from trainers.lm import unigram_perplexity


def test_unigram_perplexity_is_the_frequency_model():
    train = torch.tensor([[0, 1, 1, 2, 2, 2, 3]])  # targets 1,1,2,2,2,3 (+1 smoothing over 4 ids: 1,3,4,2 / 10)
    ev = torch.tensor([[0, 2, 2]])
    assert unigram_perplexity(train, ev, 4) == pytest.approx(10 / 4)
    flat = torch.arange(64).view(1, 64) % 8
    assert unigram_perplexity(flat, flat, 8) == pytest.approx(8.0, rel=0.05)  # uniform tokens: ppl = vocab


def test_base_lm_verdict():
    assert base_lm_verdict({"perplexity": 4.2, "unigram_perplexity": 40.0})
    assert not base_lm_verdict({"perplexity": 39.0, "unigram_perplexity": 40.0})  # learned frequencies only
    assert not base_lm_verdict({"perplexity": float("nan"), "unigram_perplexity": 40.0})
    assert not base_lm_verdict({"perplexity": BASE_LM_PPL_RATIO * 40.0 + 1e-6, "unigram_perplexity": 40.0})


def test_token_lm_verdict_needs_a_gain_on_every_task():
    start = {"eval_loss": 1.5, "eval_i2t": 1.2, "eval_t2i": 3.0}
    assert token_lm_verdict({"eval_loss": 0.8, "eval": {"i2t": 0.6, "t2i": 1.2}, "eval_at_start": start})
    assert not token_lm_verdict({"eval_loss": 1.45, "eval": {"i2t": 1.1, "t2i": 2.9}, "eval_at_start": start})
    assert not token_lm_verdict({"eval_loss": 0.8, "eval": {"i2t": 1.3, "t2i": 1.0}, "eval_at_start": start})
    assert not token_lm_verdict({"eval_loss": float("nan"), "eval": {"i2t": 0.6, "t2i": 1.2}, "eval_at_start": start})
