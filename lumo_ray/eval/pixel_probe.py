"""A small CNN on decoded pixels: the attribute probe for what a linear probe on code bags and colour
histograms cannot read (eval/fidelity.py). On the tiny VQ, count and shape are spatial: a bag of codes or
colours loses where they are and how many blobs they form (linear ceilings on the demo's real eval codes:
count 0.77, shape 0.66; this CNN: count 0.98, shape 0.97 on the gate's 64 and 0.91 on all 486).

Fixed and deterministic: one architecture (two conv blocks with max-pooling, a third conv, a 64-unit
layer, one linear head per attribute over the shared trunk), seeded init, seeded batch order, AdamW
under a one-cycle schedule for EPOCHS epochs, one torch thread: the same real train images give
byte-identical weights. Fitted on REAL train-split codes only (decoded by the run's codec), so it reads
a generated image the way it reads a real one. No Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..codecs.base import state_digest
from ..runtime import torch_threads

EPOCHS = 60
"""Passes over the train images (measured on the demo's 1478: 30 epochs read shape at 0.88, 60 at 0.91)."""
BATCH = 64
LR = 2e-3
WEIGHT_DECAY = 1e-4
WIDTHS = (16, 32, 32)
HIDDEN = 64
MAX_SIDE = 64
"""Decoded images larger than this a side are area-downsampled to it before the CNN."""
VERSION = 1
"""Part of the fidelity probe cache key: bump when the architecture or the fit changes."""


class PixelNet(torch.nn.Module):
    """[B, 3, H, W] pixels in [0, 1] (H, W <= MAX_SIDE) -> one logit vector per head."""

    def __init__(self, heads: list[int], size: tuple[int, int]):
        super().__init__()
        a, b, d = WIDTHS
        conv = lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1)  # noqa: E731
        relu = torch.nn.ReLU
        self.trunk = torch.nn.Sequential(
            conv(3, a), relu(), conv(a, a), relu(), torch.nn.MaxPool2d(2),
            conv(a, b), relu(), conv(b, b), relu(), torch.nn.MaxPool2d(2),
            conv(b, d), relu(), torch.nn.Flatten(), torch.nn.Linear(d * (size[0] // 4) * (size[1] // 4), HIDDEN), relu())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, k) for k in heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def _pixels(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, C>=3] uint8 -> [N, 3, H', W'] float in [0, 1], area-downsampled to at most MAX_SIDE a side
    (a codec decoding large images would otherwise make the fit slow; the tiny VQ's 32 px stay as they are)."""
    x = torch.as_tensor(np.ascontiguousarray(np.asarray(images)[..., :3]), dtype=torch.float32)
    x = x.permute(0, 3, 1, 2).div(255.0).contiguous()
    h, w = x.shape[2:]
    if max(h, w) > MAX_SIDE:
        x = F.interpolate(x, size=(max(1, h * MAX_SIDE // max(h, w)), max(1, w * MAX_SIDE // max(h, w))), mode="area")
    return x


@dataclass
class PixelProbe:
    """The fitted CNN: attribute -> classes (its head), the image size it reads, the weights' digest
    (codecs.base.state_digest)."""
    net: PixelNet
    classes: dict[str, tuple]
    size: tuple[int, int]
    digest: str

    def predict(self, images: list[Optional[np.ndarray]]) -> dict[str, list]:
        """attribute -> the class read per image (None where the image is None or of another size)."""
        ok = [im is not None and tuple(np.asarray(im).shape[:2]) == self.size for im in images]
        out = {a: [None] * len(images) for a in self.classes}
        idx = [i for i, good in enumerate(ok) if good]
        if not idx:
            return out
        x = _pixels(np.stack([images[i] for i in idx]))
        with torch_threads(1), torch.no_grad():
            self.net.eval()
            logits = [torch.cat(parts) for parts in zip(*(self.net(x[j:j + 256]) for j in range(0, len(x), 256)))]
        for (a, cls), lg in zip(self.classes.items(), logits):
            for i, k in zip(idx, lg.argmax(1).tolist()):
                out[a][i] = cls[k]
        return out


def fit_pixel_probe(images: np.ndarray, labels: dict[str, list], classes: dict[str, tuple], seed: int) -> PixelProbe:
    """Fit one CNN with a head per attribute of `classes` on [N, H, W, 3] uint8 images and their labels."""
    x = _pixels(images)
    y = torch.tensor([[classes[a].index(v) for v in labels[a]] for a in classes], dtype=torch.int64).T
    n, size = len(x), tuple(np.asarray(images).shape[1:3])  # the decoded size a predicted image must have
    with torch_threads(1), torch.random.fork_rng(devices=[]):  # seeded here, the process's RNG left as it was
        torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed seeds GPUs too)
        net = PixelNet([len(c) for c in classes.values()], (x.shape[2], x.shape[3]))
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * -(-n // BATCH), pct_start=0.2)
        net.train()
        for _ in range(EPOCHS):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, BATCH):
                b = perm[i:i + BATCH]
                loss = sum(F.cross_entropy(o, y[b, j]) for j, o in enumerate(net(x[b])))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
    return PixelProbe(net, dict(classes), (int(size[0]), int(size[1])), state_digest(net))
