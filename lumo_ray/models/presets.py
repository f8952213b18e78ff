"""Tiny offline model configs: real transformers classes, random init, deterministic for a seed.

They take the same code path as real checkpoints (same classes, same forward), just small enough
to train on 2 CPU cores in minutes.
"""
from __future__ import annotations

from typing import Any


def tiny_siglip_vision_config(image_size: int = 32) -> Any:
    from transformers import SiglipVisionConfig

    patch = 8 if image_size % 8 == 0 else 4
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_channels=3, image_size=image_size,
                              patch_size=patch, attention_dropout=0.0)


def tiny_qwen3_config(vocab_size: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
                       attention_dropout=0.0, use_cache=True)


def pad_to(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple
