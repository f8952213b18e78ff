"""Qwen3-architecture causal LM presets (random-initialised from the config; no download)."""
from __future__ import annotations

from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: trains in seconds on one CPU core.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=1024),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32, max_position_embeddings=2048),
    # Qwen3-0.6B's architecture (random weights), for sizing runs on a GPU.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1_000_000.0, tie_word_embeddings=True),
}


def qwen3_config(preset: str, vocab_size: int, eos_id: int | None = None, pad_id: int | None = None,
                 overrides: dict | None = None):
    from transformers import Qwen3Config

    if preset not in PRESETS:
        raise ValueError(f"unknown LM preset {preset!r}; presets: {sorted(PRESETS)}")
    kw = dict(vocab_size=vocab_size, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_dropout=0.0,
              use_cache=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    kw.update(PRESETS[preset])
    kw.update(overrides or {})
    return Qwen3Config(**kw)


def build_base_lm(preset: str, vocab_size: int, seed: int = 0, eos_id: int | None = None,
                  pad_id: int | None = None, overrides: dict | None = None):
    """A random-init Qwen3ForCausalLM, deterministic for the seed."""
    from transformers import Qwen3ForCausalLM

    cfg = qwen3_config(preset, vocab_size, eos_id, pad_id, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    return model.float()


def count_params(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
