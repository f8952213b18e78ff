"""What a tokenize run refuses before anything starts (no torch, no Ray imported): the layout's
resources, `data.tokenize.calls_per_actor`, the manifest. `pipelines.tokenize.run_tokenize` runs it
first; the command line runs it before it imports the pipeline, so a refusal costs no torch import."""
from __future__ import annotations

from typing import Any, Optional

from .errors import UserError
from .resources import Resources, job_resources
from .data.manifest import require_manifest


def tokenize_request(cfg: Any, manifest: Any, actors: Optional[int] = None) -> tuple[Resources, Resources]:
    """(loader group, tokenizer group) of the run, after refusing a layout or manifest it cannot run."""
    loaders, encoders = job_resources(cfg, "tokenize", actors)
    calls = cfg.data.tokenize.calls_per_actor
    if calls < 1:
        raise UserError("data.tokenize.calls_per_actor", None, f"is {calls}",
                        "give 1 or more (shards each tokenizer actor encodes at once)")
    require_manifest(manifest)  # before anything is written
    return loaders, encoders
