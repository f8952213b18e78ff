"""Memory planner (`lumo plan`): the per-device bytes of a token-LM / base-LM training config before
launch, by freeze mode, strategy and activation checkpointing, and whether it fits (library, no Ray).

The model is counted from its shape (Qwen3 architecture: embeddings, untied head, per layer q/k/v/o,
q/k norms, SwiGLU MLP, two RMSNorms). Per device, at the peak of a step:

    weights (4 B/param: fp32 master weights; bf16 autocast keeps them)
  + optimizer (AdamW: exp_avg + exp_avg_sq, 8 B per trainable param)
  + max(activations of the forward kept for backward + the loss head,
        gradients (4 B per trainable param) + AdamW's step temporaries)

fsdp divides weights, gradients and optimizer state by the world size and adds the gathered weights
of two decoder layers (the one computing and the one prefetched). Activations per token and layer are
the tensors autograd keeps (ACT_TERMS: a frozen layer keeps fewer, only what its input's gradient
needs); with checkpointing a layer keeps only its input, and one layer is recomputed at a time. The
loss head keeps the fp32 log-probabilities of the target positions and, in backward, twice that. benchmarks/README.md sets the estimate beside the peak
torch's MemTracker measures on CPU (the test holds it within 25 % for the tiny and small
presets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GB = 1e9
FLOAT = 4  # fp32 bytes: weights, grads, AdamW states and (on CPU) activations
MODES = ("new_rows", "lora", "full")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False


# Reference shapes the planner knows without a config.json (the public program's base model), by name
# and by hub id.
REFERENCE = {"qwen3-8b": dict(hidden=4096, inter=12288, layers=36, heads=32, kv_heads=8, head_dim=128, tied=False),
             "qwen3-1.7b": dict(hidden=2048, inter=6144, layers=28, heads=16, kv_heads=8, head_dim=128, tied=True)}
REFERENCE["Qwen/Qwen3-8B-Base"] = REFERENCE["Qwen/Qwen3-8B"] = REFERENCE["qwen3-8b"]
REFERENCE["Qwen/Qwen3-1.7B-Base"] = REFERENCE["Qwen/Qwen3-1.7B"] = REFERENCE["qwen3-1.7b"]


def shape_of(base: str, vocab: int) -> Shape:
    """A preset name (models/base_lm.PRESETS), a reference name, or a local HF directory's config.json."""
    import json
    from pathlib import Path

    from .models.base_lm import PRESETS

    if base in PRESETS:
        p = PRESETS[base]
        return Shape(vocab, p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"], p["num_attention_heads"],
                     p["num_key_value_heads"], p["head_dim"], bool(p.get("tie_word_embeddings", False)))
    if base in REFERENCE:
        return Shape(vocab, **REFERENCE[base])
    cfg = next((c for c in (Path(base) / "config.json", Path(base) / "export" / "config.json") if c.exists()), None)
    if cfg is None:
        raise ValueError(f"{base!r}: not a preset ({', '.join(sorted(PRESETS))}), a reference "
                         f"({', '.join(sorted(REFERENCE))}) or a local model directory with config.json")
    c = json.loads(cfg.read_text())
    return Shape(vocab, c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                 c.get("num_key_value_heads", c["num_attention_heads"]),
                 c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], bool(c.get("tie_word_embeddings")))


def layer_params(s: Shape) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return s.hidden * q + 2 * s.hidden * kv + q * s.hidden + 2 * s.head_dim + 3 * s.hidden * s.inter + 2 * s.hidden


def param_count(s: Shape) -> dict:
    vocab = s.vocab * s.hidden * (1 if s.tied else 2)
    return {"vocab": vocab, "layers": s.layers * layer_params(s), "total": vocab + s.layers * layer_params(s) + s.hidden}


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def trainable(s: Shape, freeze: str, lora_r: int = 8, lora_targets: tuple = LORA_TARGETS) -> int:
    """Parameters with a gradient and AdamW state: new_rows and lora keep whole vocabulary matrices
    trainable (their text rows' gradient is masked to zero, the state still exists)."""
    n = param_count(s)
    if freeze == "full":
        return n["total"]
    if freeze not in MODES:
        raise ValueError(f"freeze {freeze!r}: one of {', '.join(MODES)}")
    extra = 0
    if freeze == "lora":
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        dims = {"q_proj": (s.hidden, q), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv), "o_proj": (q, s.hidden),
                "gate_proj": (s.hidden, s.inter), "up_proj": (s.hidden, s.inter), "down_proj": (s.inter, s.hidden)}
        extra = s.layers * sum(lora_r * (dims[t][0] + dims[t][1]) for t in lora_targets)
    return n["vocab"] + extra


def act_per_token_layer(s: Shape, freeze: str = "full", lora_r: int = 8, lora_targets: tuple = LORA_TARGETS) -> int:
    """Floats autograd keeps per token for one decoder layer (ACT_TERMS; full trains the layer's
    weights, so the inputs of its projections and norms are kept too; lora adds the adapters' inputs)."""
    n = sum(f(s) for f in ACT_TERMS["always"].values())
    if freeze == "full":
        n += sum(f(s) for f in ACT_TERMS["weights train"].values())
    elif freeze == "lora":
        n += s.hidden + len(lora_targets) * lora_r  # q/k/v's normalized input (o's is the attention output), A's outputs
        if {"gate_proj", "up_proj", "down_proj"} & set(lora_targets):
            n += s.hidden + s.inter  # the MLP's normalized input and down's input
    return n


ACT_TERMS = {  # what the ops of a Qwen3 decoder layer keep for backward, per token, in floats
    "always": {  # needed for the gradient of the layer's input
        "input norm: its input": lambda s: s.hidden,
        "q/k norms: their inputs": lambda s: (s.heads + s.kv_heads) * s.head_dim,
        "attention: rotated q, k and v": lambda s: (s.heads + 2 * s.kv_heads) * s.head_dim,
        "attention: output and log-sum-exp": lambda s: s.heads * s.head_dim + s.heads,
        "post-attention norm: its input": lambda s: s.hidden,
        "MLP: gate, silu(gate), up": lambda s: 3 * s.inter,
    },
    "weights train": {  # needed only for the weights' gradients
        "normalized inputs of q/k/v and gate/up": lambda s: 2 * s.hidden,
        "normalized q, k": lambda s: (s.heads + s.kv_heads) * s.head_dim,
        "down projection's input": lambda s: s.inter,
    },
}
BACKWARD_TMP = 10  # floats per token and hidden unit that backward holds at once (gradients of hidden
#                    states and MLP intermediates), measured with MemTracker on the tiny and small presets


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss_head: float
    step_temporaries: float
    peak: float
    """Bytes per device at the peak of a step."""
    trainable: int
    params: int


def estimate(s: Shape, *, freeze: str = "full", strategy: str = "ddp", world: int = 1, micro_batch: int = 1,
             seq: int = 512, target_tokens: Optional[int] = None, checkpointing: bool = False,
             act_bytes: int = FLOAT, lora_r: int = 8, lora_targets: tuple = LORA_TARGETS) -> Estimate:
    """Per-device bytes of one training step; target_tokens: positions whose logits the loss reads (a
    base LM: every position; a token LM: the target span), default seq."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    n = param_count(s)
    tr = trainable(s, freeze, lora_r, tuple(lora_targets))
    shard = world if strategy == "fsdp" else 1
    weights = FLOAT * n["total"] / shard
    if strategy == "fsdp":
        weights += 2 * FLOAT * layer_params(s)  # gathered: the layer computing and the one prefetched
    grads, opt = FLOAT * tr / shard, 2 * FLOAT * tr / shard
    tokens = micro_batch * seq
    layer = act_per_token_layer(s, freeze, lora_r, tuple(lora_targets)) * act_bytes * tokens
    edges = 2 * s.hidden * act_bytes * tokens  # the embeddings' output and the final norm
    k = micro_batch * (target_tokens if target_tokens is not None else seq)
    logits = FLOAT * k * s.vocab  # fp32 logits of the target positions
    bwd = BACKWARD_TMP * s.hidden * act_bytes * tokens
    head = logits + max(2 * logits, bwd)  # kept log-probabilities; in backward the logits' gradient (2x)
    if checkpointing:  # each layer keeps its input; one layer is recomputed at a time, after the head is done
        acts = s.layers * s.hidden * act_bytes * tokens + edges
        act_peak = acts + max(head, layer + bwd)
    else:
        acts = s.layers * layer + edges
        act_peak = acts + head
    tmp = FLOAT * tr / shard  # AdamW (foreach): one parameter-sized temporary per group
    peak = weights + opt + max(act_peak, grads + tmp)
    return Estimate(weights, grads, opt, acts, head, tmp, peak, tr, n["total"])


def fits(e: Estimate, device_bytes: float, headroom: float = 0.9) -> bool:
    """Under `headroom` of the device: the allocator's fragmentation and the CUDA context take the rest."""
    return e.peak <= headroom * device_bytes

