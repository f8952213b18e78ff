"""FSDP2: a process group of one, sharding a model by layer, and its full / sharded state dicts
(the DDP / FSDP difference stays here and in the strategy a context prepares)."""
from __future__ import annotations

from typing import Optional

import torch


def single_process_group() -> None:
    """FSDP needs a process group; one process (tests, a notebook) gets a gloo group of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def shard(model: torch.nn.Module, device: torch.device, bf16: bool, forward_methods: tuple[str, ...] = ()) -> torch.nn.Module:
    """FSDP2: each decoder (or vision encoder) layer its own unit (gathered for its forward and backward
    only), the rest (embeddings, head, final norm; the VLM's connector) the root unit. bf16 parameters
    with fp32 gradient reduction on CUDA when bf16 is on; fp32 otherwise. forward_methods: the model's
    methods other than forward that callers enter it by (the root unit gathers on those too)."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # said on every step when a forward returns a view (the VLM's visual tokens): a caution about
    # in-place edits of the output, which no caller here makes
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
    if not any(p.is_meta for p in model.parameters()):  # a meta-built model: fully_shard moves its real tensors
        model.to(device)
    for m in list(model.modules()):
        if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer")):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(t: torch.Tensor, stop: int) -> torch.Tensor:
    """The rows < stop of a (possibly FSDP-sharded, dim-0) tensor that this rank holds: a view to edit
    in place. FSDP2 shards dim 0 in torch.chunk pieces: rank r holds rows [r * c, (r + 1) * c)."""
    if not is_sharded(t):
        return t[:stop]
    import torch.distributed as dist

    local = t.to_local()
    c = -(-t.shape[0] // dist.get_world_size())
    start = dist.get_rank() * c
    return local[: max(0, min(local.shape[0], stop - start))]


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to full CPU tensors (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_state(model: torch.nn.Module, opt: torch.optim.Optimizer, names: Optional[set[str]] = None) -> dict:
    """This rank's shards of the weights (those in `names`, else all) and of the optimizer state, keyed by
    parameter name. A fresh optimizer gets its state initialised (at lr 0) so that a load has a target."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, opt)
    return {"model": {k: v for k, v in weights.items() if names is None or k in names}, "optim": optim}
