"""The demo's recipes as `--set` items: config files with a reason per setting (lumo_ray/assets/demo,
linked as configs/demo). The demo applies them over --config, before the user's --set items; the
tests and benchmarks that build the demo's shard set (pipelines/synth_shards.py) apply the same."""
from __future__ import annotations

from ..packaged import DEMO_RECIPES
from .load import file_sets

DEMO_DATA = file_sets(DEMO_RECIPES / "data.yaml")
"""The shard settings (data.yaml)."""
DEMO_TRAINING = file_sets(DEMO_RECIPES / "lm.yaml") + file_sets(DEMO_RECIPES / "token_lm.yaml")
"""The lm stage's training budgets (lm.yaml, token_lm.yaml; measured table in docs/stage3_token_lm.md)."""
DEMO_MMPT = file_sets(DEMO_RECIPES / "mmpt.yaml")
"""Stage 4's settings over the lm stage's (mmpt.yaml)."""
