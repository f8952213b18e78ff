"""The adapter interface every text / audio / image tokenizer implements (docs/stage3_uti.md).

Adapters are plain PyTorch/NumPy code (no Ray). They work in *local* codes (0..codebook-1); the
token space maps local codes to global ids. Each adapter reports an `identity()` dict that goes
into token_space.json: it names the model (hub id, preset name, or a weights digest for local
paths) and sizes, never paths, devices or dtypes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

# Preset names of the offline models (identity = name @ a digest of the built weights, state_digest).
TEXT_PRESETS = ("tiny",)
AUDIO_PRESETS = ("tiny-24k", "tiny-48k", "full-24k", "full-48k")
IMAGE_VQ_PRESETS = ("tiny", "full")
IMAGE_SEED_PRESETS = ("tiny",)

# The vq 'tiny' preset's trained weights, shipped in the package (produced by `lumo codec train-vq`,
# see docs/stage3_uti.md "Tiny image codec"). They serve (seed 0, the preset codebook of 256); any
# other seed or codebook size builds the untrained data-dependent init (the training starting point).
TINY_VQ_WEIGHTS = Path(__file__).resolve().parent / "assets" / "vq_tiny" / "model.safetensors"
TINY_VQ_TRAINED_SEED, TINY_VQ_TRAINED_CODEBOOK = 0, 256
# The audio 'tiny-24k' preset's trained weights (EnCodec architecture, `lumo codec train-audio`, see
# docs/stage3_uti.md "Tiny audio codec"): they serve seed 0 with `uti.audio.fitted: true`; else the random init.
TINY_AUDIO_WEIGHTS = Path(__file__).resolve().parent / "assets" / "encodec_tiny24k" / "model.safetensors"
TINY_AUDIO_PRESET, TINY_AUDIO_TRAINED_SEED = "tiny-24k", 0
_DIGESTS: dict[tuple, str] = {}


class MediaError(ValueError):
    """Bad input media: the message names the file and the reason."""

    def __init__(self, path: Any, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@contextlib.contextmanager
def media_file(path: str) -> Iterator[str]:
    """A local path holding a medium named by a path or an object-store URI (s3://, gs://: fetched
    through pyarrow.fs into a temporary file, removed after). A MediaError raised inside names the
    URI, not the temporary file."""
    from ..storage import is_uri, local_file

    if not is_uri(path):
        yield path
        return
    with local_file(path) as p:
        try:
            yield str(p)
        except MediaError as e:
            raise MediaError(path, e.reason) from None


@dataclass
class AudioClip:
    """A normalized clip ready to encode: float32 [channels, samples] at the codec's rate."""
    wav: np.ndarray
    record: dict = field(default_factory=dict)
    """Preprocessing record: orig_rate, orig_channels, orig_seconds, channel_op, resampled,
    kept_fraction, padded_seconds, seconds."""


@dataclass
class AudioCodes:
    codes: np.ndarray
    """int64 [K, T] local codes."""
    side_info: dict = field(default_factory=dict)
    """Codec side-info needed to decode (EnCodec-48k: per-chunk 'scales'); JSON-serialisable."""


@dataclass
class ImageInput:
    """A preprocessed image: float32 [3, H, W] in [0, 1] (resized shorter side + center crop, RGB)."""
    pixels: np.ndarray
    record: dict = field(default_factory=dict)
    """Preprocessing record: orig_size, mode, resized_to, crop_box, size."""


class TextAdapter(Protocol):
    vocab_size: int  # len(tokenizer), including its own specials

    def identity(self) -> dict: ...
    def encode(self, text: str) -> list[int]: ...  # add_special_tokens=False
    def decode(self, ids: list[int]) -> str: ...


class AudioAdapter(Protocol):
    sample_rate: int
    channels: int
    num_codebooks: int
    codebook_size: int
    frame_rate: float
    samples_per_frame: int

    def identity(self) -> dict: ...
    def load(self, path: str) -> AudioClip: ...                    # libsndfile + channel policy + resample + pad/clip
    def prepare(self, wav: np.ndarray, rate: int, name: str = "<array>") -> AudioClip: ...
    def encode_batch(self, clips: list[AudioClip]) -> list[AudioCodes]: ...
    def decode(self, codes: AudioCodes) -> np.ndarray: ...         # float32 [channels, samples]


class ImageAdapter(Protocol):
    codebook_size: int
    tokens_per_image: int
    image_size: int
    deterministic_decode: bool

    def identity(self) -> dict: ...
    def load(self, path: str) -> ImageInput: ...
    def prepare(self, image: Any, name: str = "<image>") -> ImageInput: ...  # PIL image
    def encode_batch(self, images: list[ImageInput]) -> list[np.ndarray]: ...  # int64 [tokens_per_image]
    def decode(self, codes: np.ndarray, seed: int = 0) -> np.ndarray: ...  # uint8 [H, W, 3]


def state_digest(module: Any) -> str:
    """'sha256:<hex>' over a torch module's state dict (names, dtypes, shapes, bytes): the identity of a
    preset's weights, so changing how a preset initialises (one weight) changes the token space."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def module_weights(module: Any) -> dict[str, np.ndarray]:
    """A torch module's state dict and non-persistent buffers (EnCodec's conv strides) as numpy arrays on
    the CPU: plain data for Ray's object store, which another process assigns with `assign_weights`
    instead of drawing a random preset again."""
    out = {k: v.detach().to("cpu").numpy() for k, v in module.state_dict().items()}
    out.update({k: v.detach().to("cpu").numpy() for k, v in module.named_buffers() if k not in out})
    return out


class WeightsHandOff:
    """Hands a random preset's built weights to another process with the same config (the tokenize
    driver to its actors), so only one process draws them. An adapter sets `_model` / `_weights` to
    None, assigns `_weights` on first use of its `model`, and says which configs are random presets."""

    _model: Any = None
    _weights: "dict | None" = None

    def _random_preset(self) -> bool:
        raise NotImplementedError

    def built_weights(self) -> "dict | None":
        """The preset's weights (module_weights: numpy, float32, CPU; builds the model if not yet built)
        for another process's `use_weights`. None for weights read from files (shipped, pretrained:
        reading them is cheap) and for a model held in another dtype."""
        import torch

        if not self._random_preset() or self.dtype != torch.float32:
            return None
        return module_weights(self.model)

    def use_weights(self, weights: dict) -> None:
        """Take the model's weights from `built_weights` of another process (same config) instead of
        building them: assigned on first use (`model`)."""
        if self._model is None:
            self._weights = weights


def assign_weights(module: Any, weights: dict[str, np.ndarray]) -> Any:
    """`module` (built on the meta device: no init draws) holding copies of `weights` (module_weights of
    the same architecture): every key, exact shapes. Returns it in eval mode."""
    import torch

    keys = set(module.state_dict())
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items() if k in keys},
                           strict=True, assign=True)
    for k in sorted(set(weights) - keys):
        owner, _, leaf = k.rpartition(".")
        sub = module.get_submodule(owner)
        if leaf not in dict(sub.named_buffers(recurse=False)):
            raise ValueError(f"{type(module).__name__}: no buffer {k}")
        sub.register_buffer(leaf, torch.from_numpy(np.array(weights[k])), persistent=False)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{type(module).__name__}: {len(left)} tensors have no values, e.g. {left[:3]}")
    return module.eval()


def model_identity(model: str, seed: int, presets: tuple[str, ...]) -> str:
    """The identity string of a model reference: preset name + seed, a hub id as is, or a digest of
    the weight files of a local directory (never the path itself)."""
    import hashlib
    from pathlib import Path

    if model in presets:
        return f"{model}@seed{seed}"
    p = Path(model)
    if p.exists():
        h = hashlib.sha256()
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".model", ".txt", ".tiktoken")]
        for f in files:
            h.update(f.relative_to(p).as_posix().encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()
    return model


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes (cached per path, size and mtime)."""
    import hashlib

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def uses_tiny_vq_weights(cfg: Any) -> bool:
    """Whether an ImageConfig selects the shipped trained tiny VQ weights."""
    return (cfg.kind == "vq" and cfg.model == "tiny" and cfg.seed == TINY_VQ_TRAINED_SEED
            and cfg.codebook_size in (None, TINY_VQ_TRAINED_CODEBOOK))


def uses_tiny_audio_weights(cfg: Any) -> bool:
    """Whether an AudioConfig selects the shipped trained tiny EnCodec weights."""
    return (getattr(cfg, "kind", "encodec") == "encodec" and cfg.model == TINY_AUDIO_PRESET
            and cfg.seed == TINY_AUDIO_TRAINED_SEED and bool(getattr(cfg, "fitted", False)))


def audio_model_identity(cfg: Any) -> str:
    """Identity of the trained tiny EnCodec preset: 'tiny-24k@sha256:<sha256 of the shipped weights file>'
    (one changed weight is another token space)."""
    if not TINY_AUDIO_WEIGHTS.is_file():
        raise FileNotFoundError(f"the tiny audio preset's weights are missing: {TINY_AUDIO_WEIGHTS} (reinstall the "
                                f"package, or rebuild them with `lumo codec train-audio`, docs/stage3_uti.md)")
    return f"{TINY_AUDIO_PRESET}@sha256:" + file_sha256(TINY_AUDIO_WEIGHTS)


def image_model_identity(cfg: Any) -> str:
    """Identity of an ImageConfig's model. The trained tiny VQ preset is named by the sha256 of its
    shipped weights file ('tiny@sha256:<hex>': one changed weight is another token space); its other
    seeds / codebook sizes are the untrained init ('tiny-init@seed<N>' here; the adapter, and
    uti.declared_identity, name a built untrained preset by its weights instead:
    'tiny-init@sha256:<state digest>'). SEED-2 'real' weights come
    from several local paths (quantizer, eva_clip, unclip), so their identity is a digest over the
    digests of each."""
    import hashlib

    if uses_tiny_vq_weights(cfg):
        if not TINY_VQ_WEIGHTS.is_file():
            raise FileNotFoundError(f"the tiny VQ preset's weights are missing: {TINY_VQ_WEIGHTS} (reinstall the "
                                    f"package, or rebuild them with `lumo codec train-vq`, docs/stage3_uti.md)")
        return "tiny@sha256:" + file_sha256(TINY_VQ_WEIGHTS)
    if cfg.kind == "vq" and cfg.model == "tiny":
        return f"tiny-init@seed{cfg.seed}"
    if cfg.kind == "seed" and cfg.model == "real":
        parts = [f"{k}={model_identity(v, 0, ())}" for k, v in sorted(cfg.seed_weights.items())]
        return "seed2-weights:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return model_identity(cfg.model, cfg.seed, IMAGE_VQ_PRESETS if cfg.kind == "vq" else IMAGE_SEED_PRESETS)


def save_fit(out_dir: Path | str, model: Any, metrics: dict, save_weights: Any, log: Any) -> None:
    """Write a fitted codec's model.safetensors (through its module's `save_weights`, which returns the
    weights digest) and metrics.json carrying that digest and the file size."""
    import json

    from ..storage import write_file

    out_dir = Path(out_dir)
    metrics["weights_sha256"] = save_weights(model, out_dir / "model.safetensors")
    metrics["weights_bytes"] = (out_dir / "model.safetensors").stat().st_size
    write_file(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    log(f"[codec] wrote {out_dir / 'model.safetensors'} ({metrics['weights_bytes']} bytes, sha256 "
        f"{metrics['weights_sha256'][:16]}...) and metrics.json")
