"""Typed config of the VLM alignment stage (stages 1 and 1.1). Loaded as the `vlm:` section of LumoConfig."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VLMConfig:
    """Placeholder: the VLM issue fills this in."""
