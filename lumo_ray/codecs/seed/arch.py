"""Architecture hyper-parameters of the SEED-2 tokenizer: the published sizes and a tiny preset.

The published sizes follow AILab-CVC/SEED `Blip2QformerQuantizer` (EVA-CLIP ViT-g/14 with its last
block dropped as in BLIP-2, a BERT-base causal Q-Former with 32 queries, an 8192 x 32 codebook and
the 4-block reverse path to the 1024-d unCLIP image embedding). The tiny preset keeps every
structural element (32 causal queries, 8192 codes, low-dim codes, cross-attention every other
layer, the same module names) and shrinks only the widths and depths.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SeedArch:
    image_size: int = 224
    """Encoder input resolution (square)."""
    patch_size: int = 14
    vit_dim: int = 1408
    vit_depth: int = 39
    """EVA-CLIP ViT-g has 40 blocks; BLIP-2/SEED use the output of block 39 (the last is dropped)."""
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.3637
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    cross_attention_freq: int = 2
    """A cross-attention sub-layer on layers 0, freq, 2*freq, ... (BLIP-2 default 2)."""
    num_query_tokens: int = 32
    codebook_size: int = 8192
    codebook_dim: int = 32
    """Low-dimensional codes: queries are projected to this size before nearest-code lookup."""
    decode_depth: int = 4
    decode_heads: int = 12
    image_down_dims: tuple[int, int, int] = (256, 128, 32)
    image_embed_dim: int = 1024
    """Size of the unCLIP conditioning embedding (SD 2.1 unCLIP: the CLIP ViT-H image embedding)."""
    decode_steps: int = 20
    guidance_scale: float = 10.0
    """SEED decodes with 20 steps, guidance 10 and noise_level 0."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


REAL = SeedArch()


def tiny_arch(resolution: int) -> SeedArch:
    """Same structure, small widths. Resolution must be a multiple of 8 (patch 8, unCLIP needs /8)."""
    return replace(
        REAL, image_size=resolution, patch_size=8, vit_dim=32, vit_depth=2, vit_heads=2, vit_mlp_ratio=2.0,
        qformer_hidden=32, qformer_layers=2, qformer_heads=2, qformer_intermediate=64, codebook_dim=8,
        decode_depth=1, decode_heads=2, image_down_dims=(16, 8, 4), image_embed_dim=32, decode_steps=2)
