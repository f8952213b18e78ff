"""Strict loading of the SEED-2 checkpoints from local files (nothing is ever downloaded).

Two files fill the quantizer module: the EVA-CLIP ViT-g weights (`eva_vit_g.pth` layout, loaded into
`visual_encoder`) and the published `seed_quantizer.pt` (every other module; it may also carry
`visual_encoder.*`, which then must match too). Any missing key, any unexpected key outside the
short documented list below, and any shape mismatch is an error that lists them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

# Keys that are known to exist in public checkpoints but have no counterpart here, on purpose:
#  - the Q-Former's BERT position-id buffer (SEED drops the text embeddings that would use it);
#  - EVA-CLIP's 40th block and final norm/head: BLIP-2 and SEED read the output of block 39.
IGNORED_QUANTIZER = (re.compile(r"^Qformer\.bert\.embeddings\.position_ids$"),)


def _ignored_eva(depth: int) -> tuple[re.Pattern, ...]:
    return (re.compile(rf"^blocks\.({'|'.join(str(i) for i in range(depth, depth + 8))})\."),
            re.compile(r"^(norm|fc_norm|head)\."))


class CheckpointError(ValueError):
    """A checkpoint that does not fit the module: names the file and the offending keys."""


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SEED {what} checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(p))
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with arbitrary objects are refused, never executed
            raise CheckpointError(f"{p}: cannot read {what} checkpoint as a tensor state dict: {e}") from e
    for key in ("model", "state_dict", "module"):  # common training-wrapper layouts
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{p}: {what} checkpoint is not a mapping of tensors")
    return dict(sd)


def _short(keys: list[str], n: int = 20) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], src: str, *,
                required: set[str] | None = None, ignored: tuple[re.Pattern, ...] = ()) -> list[str]:
    """Copy `sd` into `module`. `required` (default: all module keys) must all be present; keys not
    in the module are errors unless they match `ignored`. Returns the ignored keys."""
    own = module.state_dict()
    required = set(own) if required is None else required
    missing = sorted(required - set(sd))
    skipped = sorted(k for k in sd if k not in own and any(r.search(k) for r in ignored))
    unexpected = sorted(k for k in sd if k not in own and k not in skipped)
    mismatched = sorted(f"{k} (checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})"
                        for k in sd if k in own and sd[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{src}: checkpoint does not match the SEED module"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_short(mismatched)}")
        raise CheckpointError("; ".join(parts))
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
    return skipped


def load_seed_weights(model: nn.Module, quantizer: str | Path, eva_clip: str | Path) -> dict[str, list[str]]:
    """Fill a SeedQuantizer from the EVA-CLIP file and the quantizer file. Returns ignored keys."""
    eva_sd = read_state_dict(eva_clip, "EVA-CLIP")
    depth = len(model.visual_encoder.blocks)
    ign_eva = load_strict(model.visual_encoder, eva_sd, f"{eva_clip} (seed_weights.eva_clip)",
                          ignored=_ignored_eva(depth))
    q_sd = read_state_dict(quantizer, "quantizer")
    own = model.state_dict()
    required = {k for k in own if not k.startswith("visual_encoder.")}
    ign_q = load_strict(model, q_sd, f"{quantizer} (seed_weights.quantizer)", required=required,
                        ignored=IGNORED_QUANTIZER)
    return {"eva_clip": ign_eva, "quantizer": ign_q}


def save_seed_weights(model: nn.Module, quantizer: str | Path, eva_clip: str | Path) -> None:
    """Write the two files in the layout `load_seed_weights` reads (quantizer without the ViT)."""
    from safetensors.torch import save

    from ...storage import staged_dir, write_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    q = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}
    e = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    for path, part in ((quantizer, q), (eva_clip, e)):
        if str(path).endswith(".safetensors"):
            write_file(path, save(part))
        else:  # torch.save names the archive after the file: save it under its name in a folder of ours
            with staged_dir(Path(path).parent) as tmp:
                torch.save(part, str(tmp / Path(path).name))
