"""SEED-2 image tokenizer module (image -> 32 codes -> unCLIP conditioning embedding).

Top-level names mirror AILab-CVC/SEED `Blip2QformerQuantizer` so the published `seed_quantizer.pt`
keys map one to one: visual_encoder, ln_vision, Qformer, query_tokens, quantize.embedding,
encode_task_layer, decode_task_layer, pos_embed + blocks (the causal-embedding reconstruction head,
loaded but not used by this adapter), pos_embed_image + blocks_image, image_down, distill_image_proj.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import SeedArch
from .eva_vit import EvaViT
from .qformer import CausalQFormer


class FP32LayerNorm(nn.LayerNorm):
    """`ln_vision` runs in fp32 whatever the model dtype (as BLIP-2 does for fp16 towers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class VectorQuantizer(nn.Module):
    """Nearest-code lookup (squared L2) over an `embedding` table of low-dimensional codes."""

    def __init__(self, n_e: int, e_dim: int):
        super().__init__()
        self.n_e, self.e_dim = n_e, e_dim
        self.embedding = nn.Embedding(n_e, e_dim)

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        # Distances in float64 so that near-ties cannot flip with dtype or batch composition.
        flat = z.reshape(-1, self.e_dim).double()
        e = self.embedding.weight.double()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None, :] - 2.0 * flat @ e.T
        return d.argmin(dim=1).reshape(z.shape[:-1])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embedding(idx)


class Block(nn.Module):
    """timm-style pre-norm block (BLIP-2 `vit.Block`, qkv with bias) used by the reverse path."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, dim * 3)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + self.attn.proj(a)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class SeedQuantizer(nn.Module):
    def __init__(self, arch: SeedArch):
        super().__init__()
        self.arch = arch
        h, q = arch.qformer_hidden, arch.num_query_tokens
        self.visual_encoder = EvaViT(arch.image_size, arch.patch_size, arch.vit_dim, arch.vit_depth,
                                     arch.vit_heads, arch.vit_mlp_ratio)
        self.ln_vision = FP32LayerNorm(arch.vit_dim)
        self.Qformer = CausalQFormer(h, arch.qformer_layers, arch.qformer_heads, arch.qformer_intermediate,
                                     arch.vit_dim, arch.cross_attention_freq)
        self.query_tokens = nn.Parameter(torch.zeros(1, q, h))
        self.quantize = VectorQuantizer(arch.codebook_size, arch.codebook_dim)
        self.encode_task_layer = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, arch.codebook_dim))
        self.decode_task_layer = nn.Sequential(
            nn.Linear(arch.codebook_dim, arch.codebook_dim), nn.Tanh(), nn.Linear(arch.codebook_dim, h))
        self.pos_embed = nn.Parameter(torch.zeros(1, q, h))
        self.blocks = nn.ModuleList([Block(h, arch.decode_heads) for _ in range(arch.decode_depth)])
        self.pos_embed_image = nn.Parameter(torch.zeros(1, q, h))
        self.blocks_image = nn.ModuleList([Block(h, arch.decode_heads) for _ in range(arch.decode_depth)])
        d1, d2, d3 = arch.image_down_dims
        self.image_down = nn.Sequential(nn.Linear(h, d1, bias=False), nn.ReLU(), nn.Linear(d1, d2, bias=False),
                                        nn.ReLU(), nn.Linear(d2, d3, bias=False))
        self.distill_image_proj = nn.Linear(q * d3, arch.image_embed_dim)

    def init_random(self) -> None:
        """Random init for the offline preset (call under torch.manual_seed for determinism)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                # fan-in scaled (not BERT's 0.02) so that at tiny widths the image, not the query
                # position alone, decides the codes.
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.query_tokens, self.pos_embed, self.pos_embed_image, self.visual_encoder.cls_token,
                  self.visual_encoder.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        # Codes on the scale of the projected queries so that a random model spreads over the codebook.
        nn.init.normal_(self.quantize.embedding.weight, std=0.5)

    def query_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B, 3, S, S] -> causal Q-Former outputs [B, 32, hidden]."""
        image = self.ln_vision(self.visual_encoder(pixels))
        queries = self.query_tokens.expand(pixels.shape[0], -1, -1).to(image.dtype)
        return self.Qformer(queries, image)

    @torch.no_grad()
    def get_codebook_indices(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B, 3, S, S] -> int64 codes [B, 32]."""
        return self.quantize.indices(self.encode_task_layer(self.query_features(pixels)))

    @torch.no_grad()
    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [B, 32] -> unCLIP image embedding [B, image_embed_dim]."""
        x = self.decode_task_layer(self.quantize.lookup(indices))
        x = x + self.pos_embed_image.to(x.dtype)
        for blk in self.blocks_image:
            x = blk(x)
        x = self.image_down(x).reshape(x.shape[0], -1)
        return self.distill_image_proj(x)
