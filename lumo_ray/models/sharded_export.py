"""save_pretrained for an FSDP-sharded causal LM, without a whole copy of it anywhere: the weights are
gathered one at a time (a collective: every rank calls it) and rank 0 appends each to one
model.safetensors as it comes, so a rank holds its shards plus one whole weight. The directory is the
one save_pretrained writes (config.json, generation_config.json, model.safetensors: LoRA merged, a tied
head once) and loads with from_pretrained.
"""
from __future__ import annotations

import json
import math
import struct
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


def _whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def _merged(layer) -> torch.Tensor:
    """A LoRA layer's base weight with its active adapters merged, as peft's merge_and_unload adds them."""
    w = _whole(layer.get_base_layer().weight)
    for a in layer.active_adapters:
        if layer.use_dora.get(a):
            raise ValueError("exporting a sharded DoRA model is not supported")
        delta = _whole(layer.lora_B[a].weight) @ _whole(layer.lora_A[a].weight)
        w = w + (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[a]
    return w


def plain_weights(model: torch.nn.Module) -> list[tuple[str, torch.Size, torch.dtype, Callable[[], torch.Tensor]]]:
    """(name, shape, dtype, gather) of the plain model's state dict as save_pretrained names it."""
    from peft.tuners.lora import LoraLayer

    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    out, seen = [], set()
    for path, mod in m.named_modules():
        pre = f"{path}." if path else ""
        if isinstance(mod, LoraLayer):
            base = mod.get_base_layer()
            seen.update(id(p) for p in mod.parameters())
            out.append((pre + "weight", base.weight.shape, base.weight.dtype, partial(_merged, mod)))
            if getattr(base, "bias", None) is not None:
                out.append((pre + "bias", base.bias.shape, base.bias.dtype, partial(_whole, base.bias)))
            continue
        states = [*mod.named_parameters(recurse=False),
                  *((n, b) for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set)]
        for n, t in states:
            if id(t) not in seen:  # a tied head: the embedding's, saved once
                seen.add(id(t))
                out.append((pre + n, t.shape, t.dtype, partial(_whole, t)))
    return out


def save_sharded_pretrained(model: torch.nn.Module, out: Optional[Path]) -> None:
    """Every rank calls it; the rank given `out` (rank 0) writes the directory there, the others pass None."""
    weights = plain_weights(model)
    if out is None:
        for *_, gather in weights:
            gather()
        return
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    m.config.dtype = str(next(p.dtype for p in m.parameters() if p.is_floating_point())).split(".")[1]
    m.config.architectures = [type(m).__name__.removeprefix("FSDP")]  # as save_pretrained names it
    m.config.save_pretrained(str(out))
    if m.can_generate() and m.generation_config is not None:
        m.generation_config.save_pretrained(str(out))
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in weights:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(Path(out) / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape, dtype, gather in weights:
            t = gather().contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"export: {name} gathered as {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
