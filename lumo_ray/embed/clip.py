"""A CLIP model for embeddings: the tiny random-initialised preset (offline: tests, the demo) or a local
transformers CLIPModel checkpoint with its processor. Embeddings are L2-normalised float32.

Images are preprocessed here, not by a processor object, for the preset (resize the shorter side,
centre crop, CLIP's mean/std): the same arithmetic on every worker, so the same bytes out. A checkpoint
directory brings its own CLIPProcessor (its size, crop and normalisation).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_IMAGE = 32
TEXT_LEN = 64


@dataclass
class ClipModel:
    model: Any  # transformers.CLIPModel, eval mode
    tokenizer: Any
    image_size: int
    processor: Any = None  # a checkpoint's CLIPImageProcessor; None for the preset
    name: str = "tiny"

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def identity(self) -> str:
        """sha256 of the weights (names, shapes, bytes in name order): what an embedding depends on."""
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            t = v.detach().cpu().contiguous()
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def pixels(self, image) -> np.ndarray:
        """A PIL image -> [3, S, S] float32, normalised (the CPU half: loader actors run it)."""
        if self.processor is not None:
            return self.processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0].astype(np.float32)
        return preprocess(image, self.image_size)

    @torch.no_grad()
    def embed_images(self, pixels: Sequence[np.ndarray], device: str | torch.device = "cpu") -> np.ndarray:
        if not len(pixels):
            return np.zeros((0, self.dim), np.float32)
        x = torch.from_numpy(np.stack(pixels)).to(device)
        return _unit(self.model.get_image_features(pixel_values=x))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], device: str | torch.device = "cpu") -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.text_len(),
                             return_tensors="pt")
        return _unit(self.model.get_text_features(input_ids=enc["input_ids"].to(device),
                                                  attention_mask=enc["attention_mask"].to(device)))

    def text_len(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def _unit(feats) -> np.ndarray:
    if not isinstance(feats, torch.Tensor):  # newer transformers return an output object
        feats = feats.pooler_output
    f = torch.nn.functional.normalize(feats.float(), dim=-1)
    return f.cpu().numpy().astype(np.float32)


def preprocess(image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic), centre crop, scale to [0, 1], CLIP mean/std."""
    from PIL import Image

    im = image.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    a = np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0
    a = (a - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def tiny_clip(seed: int = 0) -> ClipModel:
    """The offline preset: a 2-layer CLIP (64 wide, 8 x 8 patches of 32 x 32 images, 64-d embeddings)
    over the project's tiny text tokenizer, random weights from `seed`."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from ..codecs.text import TINY_TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=TEXT_LEN,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id or tok.eos_token_id, **common),
                     vision_config=dict(image_size=TINY_IMAGE, patch_size=8, **common), projection_dim=64)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    return ClipModel(model, tok, TINY_IMAGE, None, "tiny")


def load_clip(name: str, seed: int = 0) -> ClipModel:
    """`tiny` (the preset) or a CLIPModel checkpoint directory / cached hub id with its processor."""
    if name == "tiny":
        return tiny_clip(seed)
    from transformers import CLIPModel, CLIPProcessor

    try:
        proc = CLIPProcessor.from_pretrained(name)
        model = CLIPModel.from_pretrained(name).eval()
    except OSError as e:
        from ..errors import UserError
        raise UserError("data.embed.model", name, "is not a CLIP checkpoint this machine has",
                        f"give a local directory holding a transformers CLIPModel and its processor ({e})") from None
    crop = proc.image_processor.crop_size
    return ClipModel(model, proc.tokenizer, int(crop["height"] if isinstance(crop, dict) else crop),
                     proc.image_processor, name)


def image_preprocessor(name: str):
    """image -> [3, S, S] float32 without the model (the loader actors' half): the preset's arithmetic,
    or a checkpoint's CLIPImageProcessor."""
    if name == "tiny":
        return lambda image: preprocess(image, TINY_IMAGE)
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(name)
    return lambda image: proc(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0].astype(np.float32)
