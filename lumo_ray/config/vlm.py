"""Typed config of the VLM alignment stage (stages 1 and 1.1). Loaded as the `vlm:` section of LumoConfig.

Defaults are the tiny local preset: random-init SigLIP + Qwen3 from configs, 32 px images, 2 CPU
workers. Point `vision.model` / `llm.model` at real checkpoints (e.g. google/siglip-so400m-patch14-384,
Qwen/Qwen3-8B-Base) and `train.use_gpu` at GPUs for a cluster run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .tune import TrialResources


@dataclass
class VisionTowerConfig:
    model: str = "tiny"
    """'tiny' (random-init SigLIP vision preset) or a SigLIP hub id / local dir loaded with
    SiglipVisionModel.from_pretrained (e.g. google/siglip-so400m-patch14-384)."""
    image_size: int = 32
    """Images are resized (shorter side) and center-cropped to this; must match a real checkpoint."""
    feature_layer: int = -1
    """Hidden-state index used as patch features (-1: last layer; -2: the LLaVA-style penultimate)."""
    layernorm: bool = True
    """Apply a trainable LayerNorm to the patch features before the resampler."""
    seed: int = 0
    """Seed of the tiny random-init preset (part of its identity)."""


@dataclass
class ResamplerConfig:
    latents: int = 8
    """N: number of visual tokens per image (the `<image>` placeholder expands to N + 2 ids)."""
    depth: int = 2
    """Number of Perceiver blocks (cross-attention + feed-forward)."""
    heads: int = 4
    """Attention heads; must divide `dim`."""
    dim: int = 64
    """Width of the latents."""
    ff_mult: int = 2
    """Feed-forward hidden = ff_mult x dim."""


@dataclass
class ProjectorConfig:
    hidden: Optional[int] = None
    """Hidden width of the 2-layer GELU MLP (default: the LLM hidden size)."""


@dataclass
class LLMConfig:
    model: str = "tiny"
    """'tiny' (random-init Qwen3 preset) or a Qwen3 hub id / local dir (Qwen/Qwen3-8B-Base), loaded
    only from local files / the user's HF cache, or an object-store URI of a saved model directory
    (a text warm-up in a URI run directory is named that way)."""
    tokenizer: str = "tiny"
    """Text tokenizer (same meaning as uti.text.tokenizer): 'tiny', 'qwen3', a hub id or a dir."""
    seed: int = 0
    """Seed of the tiny random-init preset."""
    text_warmup_steps: int = 200
    """Tiny preset only (ignored for checkpoints): a frozen *random* LM cannot be steered by visual
    tokens, so before alignment the driver trains it on the train split's text with each caption
    written into the image span (it learns to read content from those positions, as a pretrained
    LLM reads context), saves it with save_pretrained under <run>/llm_text_warm and points `model`
    there. 0 = use the random LLM as is."""
    text_warmup_lr: float = 3e-3


@dataclass
class VLMDataConfig:
    source: Literal["llava_pretrain", "jsonl"] = "llava_pretrain"
    """Reader of lumo_ray.data.readers: raw LLaVA-Pretrain folder/JSON, or a normalized manifest."""
    path: str = "runs/synth/llava_pretrain"
    """Dataset folder or metadata file (e.g. `lumo data synth` output <out>/llava_pretrain)."""
    limit: Optional[int] = None
    """Use only the first `limit` records (in id order); None = all."""
    prompt_template: str = "{prompt}\nCaption:"
    """Text before the caption; `{prompt}` is the record's prompt (contains `<image>`)."""
    caption_prefix: str = " "
    """Prepended to the caption before tokenizing (byte-level BPE: word-initial space)."""
    max_seq_len: int = 128
    """Sequences are cut to this many ids (caption side only; the prompt and images are never cut)."""
    eval_size: int = 224
    """Held-out samples (stratified by caption-length bucket); at most half the data. 224: the ablation
    gate's shuffled comparison wins on ~70 % of samples, so 64 cannot reach p < 0.01 reliably
    (docs/stage1_vlm.md)."""
    bucket_edges: list[int] = field(default_factory=lambda: [6, 9, 12])
    """Caption label-length bucket edges: [0,e0), [e0,e1), ..., [e_last, inf)."""
    golden_size: int = 8
    """Golden-set samples (drawn from eval only) whose captions are dumped at checkpoints."""
    seed: int = 0
    """Seed of the eval split and golden draw."""
    decode_actors: int = 1
    """Ray Data actors per training rank that read, tokenize, decode and resize its micro-batches
    (on the rank's node, in the rank's step order); 0 = decode in a thread of the training process
    (what a run without Ray does)."""
    decode_cpus: float = 0.0
    """Ray CPUs each decode actor reserves. 0: they share the CPUs of the Train workers (the tiny
    preset's 2 workers hold a 2-CPU machine); on a GPU node reserve what decode needs, e.g. 1-4."""
    prefetch: int = 4
    """Micro-batches decoded ahead of the step that consumes them; with Ray also the micro-batches
    per Ray Data block (one decode call each: fewer, larger tasks)."""


@dataclass
class VLMTrainConfig:
    stage: Literal["align"] = "align"
    """align: train LayerNorm + resampler + projector; vision tower and LLM frozen."""
    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker; bf16 autocast is used only on CUDA."""
    accelerator_type: str = ""
    """With use_gpu: the Ray accelerator type every worker must land on (e.g. 'A100', 'H100'); '' = any GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Ray Train worker."""
    global_batch: int = 16
    """Samples per optimizer step over all workers; per-worker micro batch = global / (workers x accum)."""
    grad_accum: int = 1
    steps: int = 400
    """Optimizer steps (epochs follow from the data size; the order is reshuffled per epoch). On 224
    synthetic images the connector learns which image it sees late: 200 steps pass the ablation gate at
    some data seeds and miss it at others, 400 pass with a wide margin (docs/stage1_vlm.md)."""
    lr: float = 3e-3
    """Peak learning rate of the connector. At 1e-2 it learns that an image is there, not which one
    (shuffled gap +0.03, docs/stage1_vlm.md)."""
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    """Cosine decays to lr x min_lr_ratio at the last step."""
    clip: float = 1.0
    bf16: bool = True
    """bf16 autocast (CUDA only; CPU always runs fp32)."""
    activation_checkpointing: bool = False
    """Recompute each LLM decoder layer in the backward pass (the frozen LLM still carries the
    connector's gradient back): the same losses, a fraction of the activation memory."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every worker holds the whole VLM (the connector's gradients all-reduced). fsdp: FSDP2 shards
    the frozen LLM and vision tower per layer and the rest (connector, embeddings, head) as one unit
    across workers, for LLMs a worker cannot hold whole; checkpoints are sharded files."""
    eval_every: int = 100
    """Quick eval (first `quick_eval_size` eval samples) every K steps; 0 = never."""
    quick_eval_size: int = 32
    ckpt_every: int = 100
    """Checkpoint (and full eval + golden dump) every K steps and at the end."""
    eval_batch_size: int = 32
    seed: int = 0
    """Seed of the data order and of torch RNG."""
    out: str = "runs/vlm"
    """Run directory (config copy, metrics.json, splits, golden dumps, export): a path or an object-store
    URI (staged locally by the driver and each worker, uploaded with every checkpoint and at the end)."""
    storage_path: str = ""
    """Ray Train storage for the run's checkpoints: '' = <out>/ray, or a shared-FS path or an
    object-store URI (s3://bucket/prefix, gs://...). Launching a run on a storage_path that already
    holds checkpoints of it continues from the latest one."""
    resume: Optional[str] = None
    """A checkpoint directory (path or URI) to continue from (otherwise the run's own latest, if any)."""
    max_failures: int = 1
    """Ray Train FailureConfig: restarts from the last checkpoint after a worker dies."""
    stop_after: Optional[int] = None
    """Stop (after a checkpoint) once this step is done, keeping the schedule of `steps`; continue
    later with resume. None = run all `steps`."""
    fail_at_step: Optional[int] = None
    """Testing aid: rank 0 kills its own process (SIGKILL) once at this step (marker `<out>/.failed_once`)."""
    hold_at_step: Optional[int] = None
    """Testing aid: rank 0 pauses once at this step (marker `<out>/.held_once`) for up to HOLD_S seconds,
    so a test can kill a node at a known step whatever the machine's speed."""
    log_every: int = 20


@dataclass
class VLMAblationConfig:
    n: int = 224
    """Held-out samples (all of eval when fewer); the same as data.eval_size by default."""
    seed: int = 0
    min_win_rate: float = 0.5
    """Pass needs mean loss(correct) < each other mode and win rate >= this against each."""
    batch_size: int = 32


@dataclass
class VLMSweepConfig(TrialResources):
    """`lumo tune vlm`: a grid of learning rate x vision LayerNorm; what each trial reserves and how it
    trains (in-process, or a Ray Train run of num_workers workers): config/tune.py."""
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    layernorm: list[bool] = field(default_factory=lambda: [False, True])
    steps: int = 60
    """Steps per trial."""
    max_concurrent: int = 2
    """Trials at a time, at most (fewer when the cluster holds fewer)."""
    ablation_n: int = 32
    out: str = "runs/vlm_sweep"
    """Sweep directory (shared warm-up, trials/<name>/ run directories, results): a path or an object-store URI."""
    storage_path: str = ""
    """Ray Tune's experiment storage: '' = <out>/ray, or a shared-FS path or an object-store URI."""


@dataclass
class VLMConfig:
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    train: VLMTrainConfig = field(default_factory=VLMTrainConfig)
    ablation: VLMAblationConfig = field(default_factory=VLMAblationConfig)
    sweep: VLMSweepConfig = field(default_factory=VLMSweepConfig)
