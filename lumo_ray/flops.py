"""Training FLOPs per token and model-FLOPs utilisation (MFU) of a causal LM step (library).

FLOPs are counted the usual way (PaLM, appendix B): a matmul with N weights costs 2N per token
forward and 2N backward for its input's gradient, plus 2N for its weights' gradient when they train;
attention scores and values add 4 x layers x seq x (heads x head_dim) per token forward (and twice that
backward). The head runs only on the positions the loss reads (`target_fraction`). MFU = achieved
model FLOPs / the device's dense bf16 peak; unknown devices (CPUs among them) get no MFU.
"""
from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (SXM parts where both exist).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
                    "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0}


def device_peak_flops(device: torch.device | str) -> Optional[float]:
    """FLOP/s of the device's dense bf16 peak, or None (CPU, or a GPU not in the table)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def flops_per_token(model: torch.nn.Module, seq: int, target_fraction: float = 1.0) -> float:
    """Training FLOPs per token of one step of a transformers causal LM (decoder layers + head)."""
    cfg = model.config
    head = model.get_output_embeddings().weight
    layers = [p for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]
    matmul = sum(p.numel() for p in layers)
    trained = sum(p.numel() for p in layers if p.requires_grad)
    attn = 4 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size //
                                                                                cfg.num_attention_heads)
    body = 4 * matmul + 2 * trained + 3 * attn
    h = head.numel() * (6 if head.requires_grad else 4) * target_fraction
    return float(body + h)


def mfu(tokens_per_s: float, per_token: float, device: torch.device | str) -> Optional[float]:
    peak = device_peak_flops(device)
    return tokens_per_s * per_token / peak if peak else None
