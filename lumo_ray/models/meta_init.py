"""Models built on the meta device and filled in shard by shard after FSDP has sharded them, so that no
process holds the whole model (train.meta_init under train.strategy fsdp).

`recording()` builds with `torch.empty` on meta and records every in-place op on a meta tensor in order.
The big weights (nn.Linear, nn.Embedding, LoRA) take no memory; the small tensors made otherwise (norm
weights from torch.ones, rotary frequencies) stay real. `replay()` runs the recorded ops again on CPU
tensors, one weight at a time: each random draw comes out of the generator in the order the whole build
drew it, so every value is the whole build's, bit for bit. A `Filler` then writes each rank's rows into
the sharded parameters, from the replay or from a checkpoint's safetensors read tensor by tensor (a
rank reads only its rows).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

A = torch.ops.aten
# in-place ops that write every element of their target without reading it: a value starts over there
OVERWRITE = {A.normal_.default, A.uniform_.default, A.fill_.Scalar, A.fill_.Tensor, A.zero_.default, A.copy_.default,
             A.random_.default, A.random_.to, A.exponential_.default, A.bernoulli_.float}


class _EmptyOnMeta(TorchFunctionMode):
    """torch.empty without a device allocates on meta. (Not a meta device context: transformers skips
    its weight init under one, and its init is the part of the build whose draws must be replayed.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


class _Record(TorchDispatchMode):
    """Appends (key, shape, dtype, view, op, (args, kwargs)) per in-place op on a meta tensor: key the id
    of the tensor written (a view's base), view its (size, stride, offset) or None, (args, kwargs) None
    when they read other meta tensors. Taken at once, as sharding later changes the tensors themselves."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.alive: list = []  # the tensors written: kept alive, so that no other tensor takes their ids

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else None
        if func._schema.is_mutable and isinstance(t, torch.Tensor) and t.is_meta:
            b = t if t._base is None else t._base
            self.alive.append(b)
            view = None if t._base is None else (tuple(t.shape), t.stride(), t.storage_offset())
            rest = None if _reads_meta(args[1:], kwargs) else (args[1:], dict(kwargs))
            self.ops.append((id(b), tuple(b.shape), b.dtype, view, func, rest))
        return func(*args, **kwargs)


@contextmanager
def recording() -> Iterator[_Record]:
    """Build on meta inside; yields the recorder (its .ops: the in-place ops on meta tensors, in order)."""
    rec = _Record()
    with _EmptyOnMeta(), rec:
        yield rec


def _reads_meta(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_meta for a in (*args, *kwargs.values()))


def _draws(func) -> bool:
    return any(a.name == "generator" for a in func._schema.arguments)


def replay(rec: _Record, keep: dict[int, str], emit: Callable[[str, torch.Tensor], None],
           seed: Optional[int] = None) -> None:
    """Run recorded ops again on CPU, in order. keep: id(tensor) -> name of the tensors wanted;
    emit(name, value) once a kept tensor's last op has run. A kept tensor is held only from the last op
    that overwrites all of it; any other op runs (on scratch) only if it draws random numbers.
    seed: the build ran under torch.manual_seed(seed) in a forked RNG (build_base_lm): so does the replay."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return replay(rec, keep, emit)
    ops = rec.ops
    start, last = {}, {}
    for i, (k, _, _, view, func, rest) in enumerate(ops):
        last[k] = i
        if view is None and func in OVERWRITE and rest is not None:
            start[k] = i
    live: dict[int, torch.Tensor] = {}
    for i, (k, shape, dtype, view, func, rest) in enumerate(ops):
        kept = k in keep and i >= start.get(k, len(ops))
        if rest is None:  # computed from other meta tensors (a resize's row copy): draws nothing
            if kept:
                raise ValueError(f"meta init: {keep[k]} is computed from other weights ({func}), it cannot be replayed")
            continue
        if not kept and not _draws(func):
            continue
        buf = live.get(k) if kept else None
        if buf is None:
            buf = torch.empty(shape, dtype=dtype)
            if kept:
                live[k] = buf
        func(buf if view is None else buf.as_strided(*view), *rest[0], **rest[1])
        if kept and i == last[k]:
            emit(keep[k], live.pop(k))


def named_states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class Target:
    """The sharded model's parameters and buffers by name: which rows this rank holds, and put() to
    write them (FSDP2 shards dim 0 in torch.chunk pieces: rank r holds rows [r * c, (r + 1) * c))."""

    def __init__(self, model: torch.nn.Module):
        self.states = named_states(model)
        self.done: set[str] = set()

    def rows(self, name: str) -> tuple[int, int]:
        from torch.distributed.tensor import DTensor, Shard

        t = self.states[name]
        if not isinstance(t, DTensor):
            return 0, t.shape[0] if t.dim() else 1
        if tuple(t.placements) != (Shard(0),):
            raise ValueError(f"meta init: {name} is placed {t.placements}, only FSDP's Shard(0) is filled")
        c = -(-t.shape[0] // t.device_mesh.size())
        start = min(t.shape[0], t.device_mesh.get_local_rank() * c)
        return start, start + _local(t).shape[0]

    def put(self, name: str, value: torch.Tensor, rows_given: bool = False) -> None:
        """value: the whole tensor, or (rows_given) only this rank's rows of it."""
        local = _local(self.states[name])
        if not rows_given and local.dim():
            start, stop = self.rows(name)
            value = value[start:stop]
        if tuple(value.shape) != tuple(local.shape):
            raise ValueError(f"meta init: {name} is {tuple(local.shape)} on this rank, got {tuple(value.shape)}")
        with torch.no_grad():
            local.copy_(value)
        self.done.add(name)


class Filler:
    """Materialises a meta-built model after fully_shard: every rank allocates its shards (to_empty),
    keeps the small real tensors, then runs `steps` in order, each writing values through a Target."""

    def __init__(self, steps: list[Callable[[Target], None]]):
        self.steps = steps

    def __call__(self, model: torch.nn.Module, device: torch.device) -> None:
        real = {n: _local(t).detach().clone() for n, t in named_states(model).items() if not t.is_meta}
        model.to_empty(device=device)
        target = Target(model)
        for n, v in real.items():
            target.put(n, v, rows_given=True)
        for step in self.steps:
            step(target)
        missing = sorted(set(target.states) - target.done)
        if missing:
            raise ValueError(f"meta init: no value for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        self.steps = []  # the recorded ops hold the meta build: let it go


def meta_build(build: Callable[[], torch.nn.Module], seed: int) -> tuple[torch.nn.Module, Filler]:
    """build() (seeded with `seed` in a forked RNG, as build_base_lm is) on the meta device, and the
    Filler that replays its init into each rank's shards."""
    with recording() as rec:
        model = build()
    keep = {id(v): k for k, v in named_states(model).items() if v.is_meta}
    return model, Filler([lambda target: replay(rec, keep, target.put, seed)])


def safetensors_files(d: str | Path) -> dict[str, Path]:
    """Tensor name -> file of a Hugging Face directory's safetensors (one file or an index of several)."""
    d = Path(d)
    index = d / "model.safetensors.index.json"
    if index.exists():
        return {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    if (d / "model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {k: d / "model.safetensors" for k in f.keys()}
    raise FileNotFoundError(f"{d}: no model.safetensors(.index.json); train.meta_init reads safetensors only "
                            f"(set train.meta_init=false to load other formats whole)")


def read_tensor(files: dict[str, Path], name: str, rows: tuple[int, int] | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One tensor of a checkpoint (only rows [start, stop) of dim 0 when given), as `dtype`."""
    from safetensors import safe_open

    if name not in files:
        raise KeyError(f"checkpoint has no tensor {name!r}")
    with safe_open(str(files[name]), "pt") as f:
        t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]
    return t.to(dtype)
