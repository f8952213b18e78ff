"""Random weights that are bit-identical on every CPU, for the offline random presets.

A random preset's identity is a digest of its weights (base.state_digest), and a run refuses a token
space whose identity differs, so the weights must not depend on the machine. PyTorch's own init does:
its vectorised normal fill and the float32 convolutions behind a data-dependent init give different
low bits under AVX2, AVX-512 and the scalar build (measured: one tiny-24k seed, three digests). Here
every weight is an integer draw times a power of two (exact in float32), and whatever is computed from
data is computed in float64 and rounded to a grid far coarser than the kernels' float64 differences.
"""
from __future__ import annotations

import math
from typing import Any

import torch

_BITS = 20  # draws on a 2^-20 grid of [-1, 1): 21 bits, exact in float32's 24-bit mantissa


def _ints(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(1 << _BITS), 1 << _BITS, tuple(shape), generator=gen, dtype=torch.int64)


def pow2_bound(fan_in: int) -> float:
    """A power of two within a factor sqrt(2) of 1/sqrt(fan_in) (PyTorch's default uniform bound)."""
    return 2.0 ** -(max(int(fan_in), 1).bit_length() // 2)


def exact_uniform(shape: tuple[int, ...], gen: torch.Generator, bound: float = 1.0) -> torch.Tensor:
    """float64 uniform draws in [-bound, bound) on a 2^-20 grid; exact when bound is a power of two."""
    return _ints(shape, gen).double() * (bound * 2.0 ** -_BITS)


def unit_uniform(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """float64 zero-mean, unit-variance uniform draws (the grid scaled by sqrt(3): one IEEE rounding)."""
    return exact_uniform(shape, gen) * math.sqrt(3.0)


def round_bits(x: torch.Tensor, bits: int = 12) -> torch.Tensor:
    """x (float64) with its mantissa rounded to `bits` bits: a statistic measured in float64 on any
    CPU lands on the same value (kernels differ near 1e-15 relative; the grid is 2.4e-4)."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 2.0 ** bits) / 2.0 ** bits, e)


def _fan_in(name: str, shape: tuple[int, ...], state: dict[str, torch.Tensor]) -> int:
    if len(shape) >= 2:
        return math.prod(shape[1:])
    base, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    sibling = [f"{base}.weight", f"{base}.parametrizations.weight.original1", f"{base}.weight_v",
               f"{base}.{leaf.replace('bias', 'weight')}"]
    for s in sibling:
        if s in state and state[s].dim() >= 2:
            return math.prod(state[s].shape[1:])
    return shape[0]


@torch.no_grad()
def reinit_(module: Any, seed: int) -> None:
    """Redraw every non-constant floating tensor of module's state dict, in name order: uniform within
    pow2_bound(fan_in) (biases on their weight's scale). A weight-norm magnitude (`original0` /
    `weight_g`) is set to its direction's norm per output channel, as weight_norm initialises it,
    computed from the integer draws exactly. Constant tensors (norm scales, zero biases, empty codebook
    buffers) stay: they are the same on every machine."""
    state = module.state_dict()
    gen = torch.Generator().manual_seed(int(seed))
    drawn: dict[str, tuple[torch.Tensor, float]] = {}
    magnitudes = []
    for name in sorted(state):
        t = state[name]
        if not t.is_floating_point() or t.numel() <= 1 or bool((t == t.reshape(-1)[0]).all()):
            continue
        if name.endswith(("parametrizations.weight.original0", "weight_g")):
            magnitudes.append(name)
            continue
        bound = pow2_bound(_fan_in(name, tuple(t.shape), state))
        k = _ints(tuple(t.shape), gen)
        drawn[name] = (k, bound)
        t.copy_(k.double() * (bound * 2.0 ** -_BITS))
    for name in magnitudes:
        v = name[: -len("original0")] + "original1" if name.endswith("original0") else name[:-1] + "v"
        k, bound = drawn[v]
        norm = (k * k).reshape(k.shape[0], -1).sum(1).double().sqrt() * (bound * 2.0 ** -_BITS)
        state[name].copy_(norm.reshape(state[name].shape))
