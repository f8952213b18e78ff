"""The SEED causal Q-Former: BERT-style layers over learned queries only, with causal attention
among the queries and cross-attention to the image features every `cross_attention_freq` layers.

Module names follow the published checkpoint (`Qformer.bert.embeddings.LayerNorm`,
`Qformer.bert.encoder.layer.N.{attention,crossattention}.{self.query/key/value, output.dense,
output.LayerNorm}`, `intermediate_query.dense`, `output_query.{dense,LayerNorm}`). SEED removes the
text embeddings, the text feed-forward (`intermediate`/`output`) and the LM head, so they are not
built here either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-12  # BERT


class SelfAttn(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"Q-Former hidden size {hidden} is not a multiple of {heads} heads")
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2).reshape(x.shape)


class AttnOutput(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.self = SelfAttn(hidden, heads, kv_width)
        self.output = AttnOutput(hidden)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        # Self-attention (kv None) is causal among the queries; cross-attention sees every image token.
        return self.output(self.self(x, x if kv is None else kv, causal=kv is None), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Output(nn.Module):
    def __init__(self, inter: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(inter, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, vision_width: int, cross: bool):
        super().__init__()
        self.attention = Attention(hidden, heads, hidden)
        if cross:
            self.crossattention = Attention(hidden, heads, vision_width)
        self.has_cross_attention = cross
        self.intermediate_query = Intermediate(hidden, inter)
        self.output_query = Output(inter, hidden)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        if self.has_cross_attention:
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class Embeddings(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(queries)


class Encoder(nn.Module):
    def __init__(self, layers: list[Layer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class QFormerBert(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, inter: int, vision_width: int, cross_freq: int):
        super().__init__()
        self.embeddings = Embeddings(hidden)
        self.encoder = Encoder([Layer(hidden, heads, inter, vision_width, i % cross_freq == 0)
                                for i in range(layers)])

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(queries)
        for layer in self.encoder.layer:
            x = layer(x, image)
        return x


class CausalQFormer(nn.Module):
    """Wrapper so that keys read `Qformer.bert.*` as in the checkpoint."""

    def __init__(self, hidden: int, layers: int, heads: int, inter: int, vision_width: int, cross_freq: int):
        super().__init__()
        self.hidden_size = hidden
        self.bert = QFormerBert(hidden, layers, heads, inter, vision_width, cross_freq)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.bert(queries, image)
