"""CLIP k-means image tokenizer (`image.kind: clip_kmeans`): semantic image tokens. An image goes through
a CLIP vision tower (lumo_ray/codecs/clip.py) and each patch embedding (or the pooled one, for a
codebook fitted on the `image` column) becomes the index of its nearest codeword in a k-means codebook
(`lumo codec fit-kmeans`). Its identity is the CLIP weights' digest plus the codebook's sha256.

It has no pixel decoder: the token space records `decoder: none` for it, image -> text works end to end,
and text -> image is refused before it starts (`require_image_decoder`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ImageConfig, RuntimeConfig
from .base import ImageInput


class ClipKMeansAdapter:
    """The ImageAdapter protocol (lumo_ray.codecs.base), encode only."""

    deterministic_decode = True  # (there is no decode; the audit's repeatability checks skip it)
    decodable = False

    def __init__(self, cfg: ImageConfig, runtime: RuntimeConfig):
        from .clip import load_clip
        from .kmeans import load_codebook
        from ..errors import UserError

        if not cfg.codebook:
            raise UserError("uti.image.codebook", None, "is empty",
                            "clip_kmeans needs the folder `lumo codec fit-kmeans` wrote")
        self.cfg, self.runtime = cfg, runtime
        self.clip = load_clip(cfg.model, cfg.seed)
        self.centers, self.book = load_codebook(cfg.codebook)
        self.column = self.book.get("column", "image")
        if self.column not in ("image", "patches"):
            raise UserError("uti.image.codebook", cfg.codebook, f"was fitted on the {self.column} column",
                            "fit it on image or patches embeddings")
        if self.centers.shape[1] != self.clip.dim:
            raise UserError("uti.image.codebook", cfg.codebook, f"has {self.centers.shape[1]}-d codewords, CLIP "
                            f"{cfg.model} embeds in {self.clip.dim}", "fit it on this model's embeddings")
        self.image_size = self.clip.image_size
        self.codebook_size = int(self.centers.shape[0])
        self.tokens_per_image = self.clip.patches if self.column == "patches" else 1
        self._identity = None

    def identity(self) -> dict:
        if self._identity is None:
            self._identity = {"kind": "clip_kmeans", "model": f"clip:{self.cfg.model}@sha256:{self.clip.identity()}",
                              "codebook": f"sha256:{self.book['sha256']}", "column": self.column,
                              "codebook_size": self.codebook_size, "tokens_per_image": self.tokens_per_image,
                              "resolution": self.image_size, "decoder": "none"}
        return self._identity

    # -- input (the SEED adapter's preprocessing: CLIP's mean/std at encode time) -------------------
    def load(self, path: str) -> ImageInput:
        from .image_seed import load_image

        return load_image(path, self.image_size)

    def prepare(self, image: Any, name: str = "<image>") -> ImageInput:
        from .image_seed import preprocess

        return preprocess(image, self.image_size, name)

    # -- codes ------------------------------------------------------------------------------------
    def encode_batch(self, images: list[ImageInput]) -> list[np.ndarray]:
        """The nearest codeword (float64 distances, lowest index on ties) of each patch, row-major, or
        of the pooled embedding: int64 [tokens_per_image]."""
        from .kmeans import assign
        from ..runtime import torch_threads

        if not images:
            return []
        px = [self.clip.normalise(im.pixels) for im in images]
        with torch_threads(self.runtime.threads):
            emb = self.clip.embed_patches(px) if self.column == "patches" else self.clip.embed_images(px)[:, None]
        return [assign(e, self.centers).astype(np.int64) for e in emb]

    def decode(self, codes: np.ndarray, seed: int = 0) -> np.ndarray:
        from ..errors import UserError

        raise UserError("uti.image.kind", "clip_kmeans", "has no pixel decoder (semantic tokens, encode only)",
                        "decode images with a vq or seed image tokenizer")


def build_clip_kmeans_adapter(cfg: ImageConfig, runtime: RuntimeConfig) -> ClipKMeansAdapter:
    return ClipKMeansAdapter(cfg, runtime)
