"""A CLIP model for embeddings (`lumo data embed`, lumo_ray/embed/; the clip_kmeans image tokenizer,
image_clip.py): the tiny preset (offline: tests, the demo) or a local transformers CLIPModel checkpoint
with its processor. Embeddings are L2-normalised float32.

The tiny preset (seed 0) loads TRAINED weights shipped in the package (codecs/assets/clip_tiny, made by
`lumo codec train-clip`, trainers/codec_clip.py: near-duplicate copies embed together, synthetic scenes
beside their captions); other seeds are the random init that training starts from.

Images go through the image tokenizers' preprocessing (codecs.image_seed.preprocess: RGB, shorter side
resized bicubic, centre crop) and CLIP's mean/std (a checkpoint's processor supplies its size, mean
and std): the same arithmetic on every worker, so the same bytes out. Besides the pooled image
embedding, `embed_patches` gives one embedding per patch (the vision tower's patch states through its
final norm and the image projection: the pooled embedding's space), what the clip_kmeans image
tokenizer quantises.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .seed import CLIP_MEAN, CLIP_STD

TINY_IMAGE = 32
TEXT_LEN = 64
ASSET_DIR = Path(__file__).parent / "assets" / "clip_tiny"  # the tiny preset's trained weights
WEIGHTS = "model.safetensors"


@dataclass
class ClipModel:
    model: Any  # transformers.CLIPModel, eval mode
    tokenizer: Any
    image_size: int
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    name: str = "tiny"

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def patches(self) -> int:
        v = self.model.config.vision_config
        return (v.image_size // v.patch_size) ** 2

    def identity(self) -> str:
        """sha256 of the weights (names, shapes, bytes in name order): what an embedding depends on."""
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            t = v.detach().cpu().contiguous()
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def normalise(self, pixels01: np.ndarray) -> np.ndarray:
        """[3, S, S] in [0, 1] -> CLIP's input (mean / std)."""
        m, s = np.asarray(self.mean, np.float32)[:, None, None], np.asarray(self.std, np.float32)[:, None, None]
        return np.ascontiguousarray((pixels01 - m) / s, np.float32)

    def pixels(self, image, name: str = "<image>") -> np.ndarray:
        """A PIL image -> [3, S, S] float32, normalised (the CPU half: loader actors run it)."""
        from .image_seed import preprocess

        return self.normalise(preprocess(image, self.image_size, name).pixels)

    @torch.no_grad()
    def embed_images(self, pixels: Sequence[np.ndarray], device: str | torch.device = "cpu") -> np.ndarray:
        if not len(pixels):
            return np.zeros((0, self.dim), np.float32)
        return _unit(self.model.get_image_features(pixel_values=torch.from_numpy(np.stack(pixels)).to(device)))

    @torch.no_grad()
    def embed_patches(self, pixels: Sequence[np.ndarray], device: str | torch.device = "cpu") -> np.ndarray:
        """[n, patches, d]: each patch's state through the vision tower's final norm and the image
        projection, L2-normalised."""
        if not len(pixels):
            return np.zeros((0, self.patches, self.dim), np.float32)
        vm = self.model.vision_model
        h = vm(pixel_values=torch.from_numpy(np.stack(pixels)).to(device)).last_hidden_state[:, 1:]  # no CLS
        return _unit(self.model.visual_projection(vm.post_layernorm(h)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], device: str | torch.device = "cpu") -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        n = int(self.model.config.text_config.max_position_embeddings)
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=n, return_tensors="pt")
        return _unit(self.model.get_text_features(input_ids=enc["input_ids"].to(device),
                                                  attention_mask=enc["attention_mask"].to(device)))


def unit_features(feats) -> torch.Tensor:
    """get_image_features / get_text_features output, L2-normalised (float32)."""
    if not isinstance(feats, torch.Tensor):  # newer transformers return an output object
        feats = feats.pooler_output
    return torch.nn.functional.normalize(feats.float(), dim=-1)


def _unit(feats) -> np.ndarray:
    return unit_features(feats).cpu().numpy().astype(np.float32)


def tiny_clip(seed: int = 0, trained: bool | None = None) -> ClipModel:
    """The offline preset: a 2-layer CLIP (64 wide, 8 x 8 patches of 32 x 32 images, 64-d embeddings)
    over the project's tiny text tokenizer. Seed 0 (trained=None) loads the shipped trained weights;
    otherwise random weights from `seed` (codecs/exact_init.py)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from .text import TINY_TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=TEXT_LEN,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id or tok.eos_token_id, **common),
                     vision_config=dict(image_size=TINY_IMAGE, patch_size=8, **common), projection_dim=64)
    from .exact_init import reinit_

    model = CLIPModel(cfg).eval()
    reinit_(model, seed)  # integer draws: the same weights (and identity) on every CPU, as the other presets
    if (seed == 0) if trained is None else trained:
        from safetensors.torch import load_file

        from ..integrity import PRESET_TODO, verify_once

        verify_once(ASSET_DIR, "shipped CLIP preset", PRESET_TODO)
        model.load_state_dict(load_file(str(ASSET_DIR / WEIGHTS)))
    return ClipModel(model, tok, TINY_IMAGE)


_CACHE: dict[tuple, ClipModel] = {}


def load_clip(name: str, seed: int = 0) -> ClipModel:
    """`tiny` (the preset) or a CLIPModel checkpoint directory / cached hub id with its processor
    (built once per process)."""
    key = (name, seed if name == "tiny" else 0)
    if key not in _CACHE:
        _CACHE[key] = tiny_clip(seed) if name == "tiny" else _load_checkpoint(name)
    return _CACHE[key]


def _load_checkpoint(name: str) -> ClipModel:
    from transformers import CLIPModel, CLIPProcessor

    try:
        proc = CLIPProcessor.from_pretrained(name)
        model = CLIPModel.from_pretrained(name).eval()
    except OSError as e:
        from ..errors import UserError
        raise UserError("CLIP model", name, "is not a CLIP checkpoint this machine has",
                        f"give a local directory holding a transformers CLIPModel and its processor ({e})") from None
    ip = proc.image_processor
    crop = ip.crop_size
    size = int(crop["height"] if isinstance(crop, dict) else crop)
    return ClipModel(model, proc.tokenizer, size, tuple(ip.image_mean), tuple(ip.image_std), name)


def image_preprocessor(name: str, seed: int = 0):
    """image -> [3, S, S] float32 (the loader actors' half: a checkpoint's processor settings only)."""
    if name == "tiny":
        return load_clip(name, seed).pixels
    from transformers import CLIPImageProcessor

    ip = CLIPImageProcessor.from_pretrained(name)
    crop = ip.crop_size
    return ClipModel(None, None, int(crop["height"] if isinstance(crop, dict) else crop), tuple(ip.image_mean),
                     tuple(ip.image_std), name).pixels
