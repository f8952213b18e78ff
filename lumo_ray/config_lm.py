"""Typed config of the base LM (stage 0) and the token LM (stage 3.3). Sections `lm:` and `token_lm:`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LMConfig:
    """Placeholder: the token-LM issue fills this in."""


@dataclass
class TokenLMConfig:
    """Placeholder: the token-LM issue fills this in."""
