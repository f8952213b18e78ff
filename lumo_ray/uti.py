"""Unified Token Interface: build the adapters from a config and the token space from their sizes."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from .codecs.base import (AUDIO_PRESETS, IMAGE_SEED_PRESETS, IMAGE_VQ_PRESETS, TEXT_PRESETS, image_model_identity,
                          model_identity, uses_tiny_vq_weights)
from .config import RuntimeConfig, UTIConfig
from .runtime import torch_threads
from .token_space import AUDIO_SERIALIZATION, TokenSpace, TokenSpaceError


@dataclass
class Adapters:
    text: Any = None
    audio: Any = None
    image: Any = None


def build_adapters(cfg: UTIConfig, which: tuple[str, ...] = ("text", "audio", "image")) -> Adapters:
    """Instantiate the configured adapters (tiny presets are random-init, no network)."""
    with torch_threads(cfg.runtime.threads):
        return _build_adapters(cfg, which)


def _build_adapters(cfg: UTIConfig, which: tuple[str, ...]) -> Adapters:
    a = Adapters()
    if "text" in which and cfg.text.load:
        from .codecs.text import build_text_adapter
        a.text = build_text_adapter(cfg.text)
    if "audio" in which and cfg.audio.kind != "none" and cfg.audio.load:
        from .codecs.audio import build_audio_adapter
        a.audio = build_audio_adapter(cfg.audio, cfg.runtime, batch_invariant=cfg.runtime.batch_invariant)
    if "image" in which and cfg.image.kind != "none" and cfg.image.load:
        if cfg.image.kind == "vq":
            from .codecs.image_vq import build_vq_adapter
            a.image = build_vq_adapter(cfg.image, cfg.runtime)
        elif cfg.image.kind == "clip_kmeans":
            from .codecs.image_clip import build_clip_kmeans_adapter
            a.image = build_clip_kmeans_adapter(cfg.image, cfg.runtime)
        else:
            from .codecs.image_seed import build_seed_adapter
            a.image = build_seed_adapter(cfg.image, cfg.runtime)
    return a


def _need(value: Optional[int], what: str) -> int:
    if value is None:
        raise TokenSpaceError(f"{what} must be declared in the config when the model is not loaded")
    return value


# Sizes a config may declare for each modality; a loaded (or built) adapter must agree with them.
_SIZES = {"text": ("vocab_size",), "image": ("codebook_size", "tokens_per_image"),
          "audio": ("sample_rate", "channels", "num_codebooks", "codebook_size")}


def _is_preset(section: str, c: Any) -> bool:
    if section == "text":
        return c.tokenizer in TEXT_PRESETS
    if section == "audio":
        return c.model in AUDIO_PRESETS
    if c.kind == "clip_kmeans":  # named by the CLIP weights and the codebook file: always built to name it
        return True
    presets = IMAGE_VQ_PRESETS if c.kind == "vq" else IMAGE_SEED_PRESETS
    return c.model in presets and not uses_tiny_vq_weights(c)  # shipped weights: named by the file digest


def _identity(section: str, adapter: Any, c: Any) -> dict:
    ident = adapter.identity()
    for k in _SIZES[section]:
        if getattr(c, k, None) is not None and getattr(c, k) != ident[k]:
            raise TokenSpaceError(f"{section}.{k} is declared as {getattr(c, k)} but the loaded adapter has {ident[k]}")
    return ident


# A preset's identity is a digest of what it encodes with (codecs.base.state_digest), so even when the
# config says not to load it, a preset is built (offline, seconds) to name it; declared sizes are for
# real checkpoints that are not at hand.

def declared_identity(section: str, c: Any, runtime: Optional[RuntimeConfig] = None) -> dict:
    """The identity of one modality's adapter that the config does not load."""
    if _is_preset(section, c):
        uti = UTIConfig(runtime=runtime or RuntimeConfig(), **{section: replace(c, load=True)})
        return _identity(section, getattr(_build_adapters(uti, (section,)), section), c)
    if section == "text":
        return {"kind": "hf_tokenizer", "name": model_identity(c.tokenizer, 0, TEXT_PRESETS),
                "vocab_size": _need(c.vocab_size, "text.vocab_size")}
    if section == "audio":
        return {"kind": "encodec", "model": model_identity(c.model, c.seed, AUDIO_PRESETS),
                "sample_rate": _need(c.sample_rate, "audio.sample_rate"),
                "channels": _need(c.channels, "audio.channels"), "bandwidth": float(c.bandwidth),
                "num_codebooks": _need(c.num_codebooks, "audio.num_codebooks"),
                "codebook_size": _need(c.codebook_size, "audio.codebook_size"),
                "serialization": AUDIO_SERIALIZATION}
    return {"kind": c.kind, "model": image_model_identity(c),
            "codebook_size": _need(c.codebook_size, "image.codebook_size"),
            "tokens_per_image": _need(c.tokens_per_image, "image.tokens_per_image"),
            "resolution": c.resolution}


def build_token_space(cfg: UTIConfig, adapters: Adapters | None = None) -> TokenSpace:
    """Lay out the token space from loaded adapters, or from declared sizes where not loaded."""
    adapters = adapters or Adapters()
    ident: dict[str, dict] = {}
    for section in ("text", "image", "audio"):
        c = getattr(cfg, section)
        if section != "text" and c.kind == "none":
            continue
        a = getattr(adapters, section)
        ident[section] = _identity(section, a, c) if a is not None else declared_identity(section, c, cfg.runtime)
    ts_cfg = cfg.token_space
    return TokenSpace.from_sizes(
        text_vocab=ident["text"]["vocab_size"], specials=ts_cfg.specials, special_slots=ts_cfg.special_slots,
        image_codebook=ident["image"]["codebook_size"] if "image" in ident else None,
        audio_codebooks=ident["audio"]["num_codebooks"] if "audio" in ident else 0,
        audio_codebook_size=ident["audio"]["codebook_size"] if "audio" in ident else None,
        adapters=ident, pad_multiple=ts_cfg.pad_multiple)


def load_token_space(cfg: UTIConfig) -> TokenSpace:
    """The token space of a config, loading whatever adapters it says to load."""
    return build_token_space(cfg, build_adapters(cfg))
