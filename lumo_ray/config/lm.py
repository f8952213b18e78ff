"""Typed config of the base LM (stage 0) and the token LM (stage 3.3). Sections `lm:` and `token_lm:`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .tune import TrialResources

DEFAULT_TEMPLATES = {
    "i2t": ["Describe the image.", "What is shown in this picture?", "Write a short caption for this image."],
    "a2t": ["Describe the sound.", "What can you hear?", "Write a short caption for this sound."],
    "t2i": ["Draw a picture of the caption.", "Generate an image of this description."],
    "t2a": ["Generate the sound of the caption.", "Make a sound that matches this description."],
}


@dataclass
class TrainConfig:
    """Optimisation and Ray Train settings shared by the base LM and the token LM."""
    steps: int = 300
    """Optimizer steps."""
    global_batch: int = 16
    """Sequences per optimizer step over all workers (the config unit); per-worker micro batch =
    global_batch / (num_workers * grad_accum)."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step on each worker."""
    lr: float = 3e-3
    """Peak learning rate of the pre-existing (non-new-row) trainable parameters."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay of the pre-existing trainable parameters (never applied to new rows)."""
    clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Ray Train worker."""
    use_gpu: bool = False
    """One GPU per worker; bf16 autocast is used only on CUDA."""
    accelerator_type: str = ""
    """With use_gpu: the Ray accelerator type every worker must land on (e.g. 'A100', 'H100'); '' = any GPU."""
    bf16: bool = True
    """bf16 autocast when the worker runs on CUDA (ignored on CPU, which always trains in fp32)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (transformers' gradient checkpointing, non-reentrant): less memory, one more forward per step,
    the same losses."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every worker holds the whole model, its gradients and AdamW state. fsdp: FSDP2 shards them
    across workers per decoder layer (bf16 parameters / fp32 reduction on CUDA with bf16, fp32 on CPU);
    checkpoints are sharded torch.distributed.checkpoint files (each rank writes its own shard), and a
    run resumes from them on any worker count."""
    meta_init: bool = True
    """With strategy fsdp, no worker holds the whole model: each builds it on the meta device, shards it,
    then fills only its own shards (a preset's random init replayed weight by weight, a checkpoint's
    safetensors read tensor by tensor: the whole build's values, bit for bit), and the export gathers
    one weight at a time. false: every worker builds (or loads) the whole model before sharding it."""
    seed: int = 0
    """Model init, data order and crop randomness all derive from this seed."""
    eval_every: int = 100
    """Steps between eval-loss passes (and at the last step)."""
    ckpt_every: int = 100
    """Steps between checkpoints (and at the last step)."""
    log_every: int = 20
    """Steps between progress lines (and reports); a line also at a run's first and last step."""
    max_failures: int = 0
    """Ray Train FailureConfig: worker restarts from the last checkpoint."""
    resume: str = ""
    """'' (fresh run), 'auto' (the newest checkpoint in the run directory that verifies against its
    SHA256SUMS, saying which it skipped; a fresh run when there is none, refused when none verifies) or a
    checkpoint directory (a local path or an object-store URI; refused unless it verifies)."""
    storage_path: str = ""
    """Ray Train storage for this run's reported checkpoints: '' = <out>/ray, or a shared-FS path or
    an object-store URI (s3://bucket/prefix, gs://...). One per run: launching a run on a storage_path
    that already holds checkpoints resumes from the latest one."""
    threads: int = 1
    """torch intra-op threads per worker."""


@dataclass
class LMConfig:
    """Stage 0: text-only pretraining of a Qwen3-architecture causal LM with the BPE tokenizer."""
    preset: Literal["tiny", "small", "qwen3-0.6b"] = "tiny"
    """Architecture preset (lumo_ray.models.base_lm); random-initialised from its config."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Overrides of Qwen3Config fields (e.g. {hidden_size: 128, num_hidden_layers: 4})."""
    tokenizer: str = "tiny"
    """'tiny' (the bundled BPE), a tokenizer directory from `lumo tokenizer train`, or a hub id."""
    inputs: list[str] = field(default_factory=list)
    """manifest.jsonl files (text.prompt + text.caption) or text files (one text per line)."""
    eval_fraction: float = 0.1
    """Share of the texts held out for eval loss / perplexity (by a hash of the text)."""
    seq_len: int = 128
    """Tokens per packed training sequence. A base LM for the token LM should see blocks at least as
    long as the token LM's x2t sequences (64 image ids + delimiters + caption ~ 80 tokens in the tiny
    program): a token LM trained on new rows only reads media through the base's frozen attention,
    which learned nothing about positions past seq_len (at 64 the demo's image reading was weak and
    the noise gap seed-dependent; docs/stage3_token_lm.md)."""
    out: str = "runs/lm"
    """Run directory: config, metrics.json, checkpoints, export/ (the HF directory); a path or an
    object-store URI (staged locally, uploaded without checkpoints/, which go through storage_path)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, lr=3e-3, eval_every=100))


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names LoRA adapts."""


@dataclass
class SequenceConfig:
    """How a shard sample becomes a training sequence (lumo_ray.data.sequences)."""
    layouts: Literal["own", "both", "any"] = "own"
    """'own': each sample uses its manifest task (i2t, a2t, ...); 'both': x2t samples also train the
    reverse t2x layout with probability reverse_prob; 'any' (stage 4, `lumo train mmpt`): each
    sequence's task is drawn from token_lm.mmpt.task_weights and takes the next sample of that task's
    modality, so every x2t sample also yields its t2x twin."""
    reverse_prob: float = 0.5
    """Probability of the reverse layout when layouts='both'."""
    delimiters: Literal["full", "compact"] = "full"
    """'full': <|img_start|> media <|img_end|> <|gen_text|> <|text_start|> caption <|text_end|>;
    'compact': <|img_start|> media <|img_end|> caption <|text_end|> (no generation / start token)."""
    instruction: Literal["none", "fixed", "templates", "data"] = "none"
    """Instruction text before the input span: none, the first template of the task, a random
    template (first one in eval), or the sample's own prompt from the manifest."""
    templates: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_TEMPLATES.items()})
    """Instruction templates per task."""
    max_audio_tokens: int = 150
    """Audio spans longer than this are cropped on frame boundaries (codebook phase kept). An input
    span (a2t) is cropped at random in training and centred in eval; a target span (t2a) is always
    the centred crop, the part of the clip its caption is trained to predict."""
    max_len: int = 512
    """Sequences longer than this are refused (the builder never truncates a target)."""
    modality_dropout: float = 0.0
    """Training only: probability of dropping the media input span of an x2t sample."""
    caption_dropout: float = 0.0
    """Training only: probability that a t2i / t2a sample's caption is replaced by the unconditional form
    (no caption tokens between the same <|text_start|> ... <|text_end|> <|gen_*|> delimiters), so the
    model also learns p(media | no caption), the unconditional half of classifier-free guidance
    (`lumo generate --guidance-scale`). Drawn from the sample's training generator, a function of
    (seed, epoch, position, rank) like the crops: the same samples are dropped on a resumed run.
    Never applied to i2t / a2t, nor in eval. 0 (off) by default, the demo included: 0.1 (LlamaGen, Janus)
    trains a model for guidance; docs/stage4_mmpt.md measures both and says why it is not the default."""
    pack: bool = True
    """Training and eval-loss batches lay their sequences end to end into as few rows as hold them
    (lumo_ray.data.sequences.pack) instead of padding each to the longest: the same sequences and the
    same losses, far fewer pad positions computed. Each sample attends only to itself, its positions
    restart at 0 and no label crosses a sample boundary."""
    pack_len: int = 0
    """Row length cap in tokens: rows hold at most max(pack_len, the micro-batch's longest sequence).
    0: the longest sequence, so a row is never wider than the padded batch's and costs no more
    attention; set it above the longest (e.g. max_len) when short sequences should share rows with
    long ones (configs/reference: 1,200-token audio beside 40-token images)."""


@dataclass
class AblationConfig:
    """The modality ablation (docs/gates.md) on a fixed seeded eval slice."""
    split: str = "eval"
    """Shard split the slice is drawn from."""
    n: int = 64
    """Samples per modality (all when fewer)."""
    seed: int = 0
    """Seed of the slice, the shuffle pairing and the noise ids."""
    batch_size: int = 16
    min_shuffle_gap: float = 0.10
    """Mean loss gap (nats) shuffled - correct required to pass."""
    min_shuffle_win: float = 0.80
    min_noise_gap: float = 0.15
    """Mean loss gap (nats) noise - correct required to pass."""
    min_noise_win: float = 0.85
    modalities: list[str] = field(default_factory=lambda: ["image", "audio"])
    """Modalities that must pass (those absent from the slice are reported as missing and fail)."""


@dataclass
class InvarianceConfig:
    """Text invariance (docs/gates.md)."""
    prompts: list[str] = field(default_factory=lambda: [
        "a red circle on the left", "two short high beeps", "The quick brown fox jumps over the lazy dog.",
        "Describe the image.", "three blue squares at the top"])
    """Text-only prompts whose logits over the original vocabulary must not change."""


@dataclass
class FidelityConfig:
    """Generation fidelity (docs/gates.md) (`lumo eval fidelity`): an attribute probe fitted on real train-split
    codes reads codes generated for eval captions (lumo_ray.eval.fidelity)."""
    n: int = 64
    """Eval captions per modality (all when fewer), chosen by seed."""
    seed: int = 0
    """Seed of the eval selection, the caption swap, the sampling and the bootstrap."""
    split: str = "eval"
    """Shard split whose captions are generated for and whose real codes give the probe's ceiling."""
    temperature: float = 1.0
    """Sampling temperature. 1.0 with top_k 0 are the defaults of `lumo generate`: the gate measures the
    generations users get, and sharpening would hide a model that spreads mass over wrong codes."""
    top_k: int = 0
    """Top-k filter while sampling (0: off)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance of the t2i / t2a generations (lumo_ray.generate.GenOptions.guidance_scale;
    1: none, the gate's default: it measures what `lumo generate` gives by default)."""
    batch_size: int = 64
    """Prompts per generation batch (the sampled ids depend on it: part of the determinism key)."""
    probe_min: float = 0.95
    """A gated attribute needs the probe to read real eval codes at least this well (else the gate fails:
    the probe cannot read it); a reported attribute below it is marked unreadable (issue 34: a probe
    that judges generations must itself read real codes at >= 0.95)."""
    fraction: float = 0.5
    """Generated accuracy must reach chance + fraction x (ceiling - chance)."""
    max_p: float = 0.01
    """Paired one-sided sign test generated vs swapped: p must be below this when n makes it attainable."""
    gated: dict[str, list[str]] = field(default_factory=lambda: {"image": ["colour"], "audio": ["pitch"]})
    """Attributes that gate per modality; the others (image shape / count / position, audio count /
    length) are reported."""
    samples: int = 4
    """Generated samples per modality saved (PNG / WAV) into the report with their captions."""
    captions: bool = True
    """Also caption the same eval samples (i2t / a2t) and score what the captions say (lumo_ray.eval.captions:
    per attribute, against the sample's own and a swapped sample's attributes), with the field's metrics
    (CIDEr-D, BLEU-4; CLIPScore and a Fréchet distance on CLIP features for t2i; eval/field_metrics.py)."""
    gate_captions: bool = False
    """Whether the caption-accuracy verdicts (every attribute: generated >= chance + fraction x (1 - chance),
    above the swapped floor, p < max_p) count in the fidelity verdict. Off: they are computed and reported,
    not enforced. Measured on the seed-0 demo's stage 4 (n 64; docs/stage4_mmpt.md, "Caption accuracy"): i2t
    colour 0.84, a2t pitch 0.98 and length 0.95 pass, but i2t shape 0.48 / count 0.48 / position 0.47 and a2t
    count 0.58 fall short of their targets (0.69 / 0.66 / 0.62 / 0.70) while every gate of the demo passes, so
    enforcing them would fail the demo: they gate once stage 4 reads those attributes (issue 34)."""
    clip_model: str = ""
    """CLIP for the t2i field metrics (CLIPScore, Fréchet distance): '' = the shipped tiny preset (offline,
    lumo_ray.codecs.clip), or a local directory holding a transformers CLIPModel and its processor."""


@dataclass
class PromptStudyConfig(TrialResources):
    """`lumo tune prompts`: a Ray Tune study of sequence/prompt choices (each list is a search axis);
    what each trial reserves and how it trains: config/tune.py (cpus_per_trial, num_workers, ...)."""
    instruction: list[str] = field(default_factory=lambda: ["none", "fixed", "templates"])
    delimiters: list[str] = field(default_factory=lambda: ["full", "compact"])
    new_row_lr: list[float] = field(default_factory=lambda: [1e-2, 3e-2])
    init_scale: list[float] = field(default_factory=lambda: [0.02, 0.2])
    max_audio_tokens: list[int] = field(default_factory=lambda: [150, 300])
    modality_dropout: list[float] = field(default_factory=lambda: [0.0, 0.1])
    num_samples: int = 8
    """Trials (random draws from the grid above)."""
    steps: int = 120
    """Training steps per trial."""
    report_every: int = 40
    """Steps between intermediate objective reports (the ASHA rungs)."""
    grace_period: int = 1
    """ASHA: reports before a trial may be stopped."""
    reduction_factor: int = 2
    ablation_n: int = 16
    """Eval samples per modality when scoring a trial."""
    out: str = "runs/tune_prompts"
    """Study directory (config, results.csv/md, best.json, best_config.yaml): a path or an object-store URI."""
    storage_path: str = ""
    """Ray Tune's storage (experiment state and each trial's directory: config, score.json, run/):
    '' = <out>, or a shared-FS path or an object-store URI (trial directories are synced there)."""
    seed: int = 0


@dataclass
class TaskWeights:
    """Share of stage-4 training sequences per task (normalised over the tasks with weight > 0)."""
    i2t: float = 0.25
    a2t: float = 0.25
    t2i: float = 0.25
    t2a: float = 0.25


@dataclass
class MMPTStudyConfig(TrialResources):
    """`lumo tune mmpt`: a Ray Tune study of the stage-4 mix and optimisation (each list is a search
    axis; what each trial reserves and how it trains: config/tune.py). Trials start from
    token_lm.mmpt.init like `lumo train mmpt`; objective = mean eval loss over i2t, a2t, t2i, t2a on a
    fixed eval slice (lower is better), with the prompt ablation (t2i, t2a) and the modality ablation
    (image, audio) as constraints: a trial failing one is infeasible."""
    t2x_share: list[float] = field(default_factory=lambda: [0.5, 0.6])
    """Share of t2x sequences (split evenly between t2i and t2a; the rest evenly between i2t and a2t)."""
    ramp_steps: list[int] = field(default_factory=lambda: [0, 20])
    """token_lm.mmpt.ramp_steps (the blend takes as many steps again)."""
    lora_r: list[int] = field(default_factory=lambda: [4, 8])
    """LoRA rank (alpha = 2 r)."""
    new_row_lr: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    lora_lr: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    """token_lm.train.lr: under freeze=lora the LoRA parameters are the ones it applies to."""
    num_samples: int = 8
    """Trials (random draws from the grid above)."""
    steps: int = 80
    """Training steps per trial."""
    report_every: int = 40
    """Steps between scored reports (the ASHA rungs)."""
    grace_period: int = 1
    reduction_factor: int = 2
    n: int = 24
    """Eval samples per modality for the objective and each constraint."""
    out: str = "runs/tune_mmpt"
    """Study directory (config, results.csv/md, best.json, best_config.yaml): a path or an object-store URI."""
    storage_path: str = ""
    """Ray Tune's storage: '' = <out>, or a shared-FS path or an object-store URI."""
    seed: int = 0


@dataclass
class MMPTConfig:
    """Stage 4 (`lumo train mmpt`): any-to-any training on i2t, a2t, t2i and t2a built from the same
    shards. Used when token_lm.seq.layouts='any' (what `lumo train mmpt` sets by default)."""
    init: str = ""
    """A stage-3.3 token-LM run directory (or its export/) to start from: its extended vocabulary and
    trained new rows are loaded as they are; '' = warm start from token_lm.base like stage 3.3."""
    task_weights: TaskWeights = field(default_factory=TaskWeights)
    """A task takes its samples from the stream of its modality, so audio is trained as often as the
    weights say however few clips there are (the public trial: 0.25 each)."""
    ramp_steps: int = 0
    """x2t only for the first ramp_steps steps (the t2x weights are 0)."""
    blend_steps: int = 0
    """After the ramp the t2x weights rise linearly to their value over this many steps (0: at once)."""
    golden_n: int = 4
    """Golden prompts per task generated and decoded at every checkpoint into <run>/golden/step_N/
    (0: none). A fixed, seeded set (lumo_ray.eval.gates.golden_set): the same at every checkpoint."""
    golden_seed: int = 0
    """Seed of the golden set and of its sampling."""
    study: MMPTStudyConfig = field(default_factory=MMPTStudyConfig)


@dataclass
class ShardSource:
    """One source of a token-LM data mix (an entry of `token_lm.shards` given as a list)."""
    path: str = ""
    """Tokenized shard directory (`lumo data tokenize`): a path or an object-store URI."""
    weight: float = 1.0
    """Share of the training samples drawn from this source, normalised over the sources (0: never drawn)."""


@dataclass
class TokenLMConfig:
    """Stage 3.3: warm-start a causal LM on the extended vocabulary and train it on shards."""
    base: str = "tiny"
    """Base causal LM: a local HF directory (e.g. the export of `lumo train lm`), a hub id, or
    'tiny' (a random-init tiny Qwen3 preset with the token space's text vocabulary)."""
    shards: str | list[ShardSource] = ""
    """Tokenized shard directory (`lumo data tokenize`), or a mix: a list of {path, weight} sources
    (lumo_ray.data.mix). Every source's token-space hash must match the run's."""
    freeze: Literal["new_rows", "lora", "full"] = "new_rows"
    """new_rows: only the rows beyond TEXT of embeddings and head learn; lora: LoRA + new rows; full."""
    init_scale: float = 0.02
    """New rows = mean of the TEXT rows + N(0, (init_scale * std of the TEXT rows)^2)."""
    new_row_lr: float = 1e-2
    """Learning rate of the new rows (train.lr applies to everything else)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    seq: SequenceConfig = field(default_factory=SequenceConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    invariance: InvarianceConfig = field(default_factory=InvarianceConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    prompt_study: PromptStudyConfig = field(default_factory=PromptStudyConfig)
    mmpt: MMPTConfig = field(default_factory=MMPTConfig)
    out: str = "runs/token_lm"
    """Run directory: config, metrics.json, checkpoints/, export/ (HF dir + token_space.json); a path or
    an object-store URI (staged locally, uploaded without checkpoints/, which go through storage_path)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, lr=1e-3, warmup_steps=20))
