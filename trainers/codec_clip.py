"""`lumo codec train-clip`: train the tiny CLIP preset (`data.embed.model: tiny`) on the one training
loop, in one process and one thread (no Ray: small enough for minutes, and one thread keeps the
weights byte-identical).

The draws, the two contrastive losses and the near-duplicate measurement are library code
(lumo_ray/embed/clip_train.py); `TinyClip` is the loop's workload (trainers/loop.py), `train_tiny_clip`
the fit, `train_preset` the command (measure, train, measure, write the preset).
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from lumo_ray.codecs.clip import tiny_clip, unit_features
from lumo_ray.embed.clip_train import draws, image_image_loss, image_text_loss, near_duplicate_eval, save_preset

from trainers.context import LocalContext
from trainers.loop import Cadence, Due, Workload, run_steps

LOG_EVERY = 50
"""Steps between progress lines (1-based: 1, 50, 100, ..., the last) and between meta.json's history rows
(0-based, as the shipped preset's history was written: 0, 50, 100, ..., the last)."""


class TinyClip(Workload):
    """The tiny CLIP as the one loop's workload: its seeded init, AdamW under warmup + cosine, per-step
    seeded draws (`draws`); loss = image-image InfoNCE + image-text CLIP loss + align x (1 - cosine of
    the two copies); clipping at 1."""

    def __init__(self, seed: int, steps: int, batch: int, lr: float, tau: float, align: float):
        self.seed, self.steps, self.batch, self.tau, self.align = seed, steps, batch, tau, align
        self.clip = tiny_clip(seed, trained=False)
        self.model = self.clip.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        warm = max(1, steps // 20)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        self.n_text = int(self.model.config.text_config.max_position_embeddings)
        self.hist: list[dict] = []
        self.t0 = time.time()

    def train_step(self, step: int) -> dict:
        model, clip = self.model, self.clip
        v1, v2, caps = draws(clip, step, self.seed, self.batch)
        zi1, zi2 = (unit_features(model.get_image_features(pixel_values=v)) for v in (v1, v2))
        enc = clip.tokenizer(caps, padding="max_length", truncation=True, max_length=self.n_text, return_tensors="pt")
        zt = unit_features(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        l_ii = image_image_loss(zi1, zi2, self.tau)
        l_it = image_text_loss(zi1[:len(caps)], zt, caps, self.tau)
        loss = l_ii + l_it + self.align * (1 - (zi1 * zi2).sum(1)).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        return {"step": step + 1, "loss": loss.item(), "image_image": l_ii.item(), "image_text": l_it.item()}

    def after_step(self, done: int, due: Due, rep: dict, ck: Optional[Path]) -> dict:
        if (done - 1) % LOG_EVERY == 0 or done == self.steps:  # the history counts steps from 0
            self.hist.append({"step": done - 1, "image_image": round(rep["image_image"], 4),
                              "image_text": round(rep["image_text"], 4)})
        return {}

    def line(self, done: int, rep: dict, rate) -> str:
        return (f"[train-clip] step {done}/{self.steps} image-image {rep['image_image']:.3f} image-text "
                f"{rep['image_text']:.3f} ({time.time() - self.t0:.0f} s)")


def train_tiny_clip(seed: int = 0, steps: int = 3000, batch: int = 128, lr: float = 2e-3, tau: float = 0.05,
                    align: float = 6.0, log: Callable[[str], None] = print):
    """The trained preset: returns (ClipModel, history). `tau`: the contrastive temperature; `align`:
    the weight of a plain 1 - cosine term between the two copies, which lifts their cosine over dedup's
    0.95 threshold (InfoNCE alone ranks them first but leaves shifted copies near 0.9)."""
    torch.set_num_threads(1)
    w = TinyClip(seed, steps, batch, lr, tau, align)
    run_steps(w, LocalContext(), Cadence(LOG_EVERY), steps, Path("."), None, log)
    w.model.eval()
    return w.clip, w.hist


def train_preset(out_dir: str | Path, seed: int = 0, steps: int = 3000, batch: int = 128, lr: float = 2e-3,
                 log: Callable[[str], None] = print) -> dict:
    """`lumo codec train-clip`: train, measure before and after (near_duplicate_eval), write the weights
    and meta.json (the command, the seconds, the measurements); returns the meta."""
    t0 = time.time()
    before = near_duplicate_eval(tiny_clip(seed, trained=False))
    clip, hist = train_tiny_clip(seed, steps, batch, lr, log=log)
    meta = {"what": "trained weights of the data.embed 'tiny' CLIP preset (transformers.CLIPModel, "
                    "architecture lumo_ray.codecs.clip.tiny_clip)",
            "command": f"lumo codec train-clip --out {out_dir} --seed {seed} --steps {steps} --batch {batch} --lr {lr}",
            "seed": seed, "steps": steps, "batch": batch, "lr": lr,
            "params": sum(p.numel() for p in clip.model.parameters()),
            "machine": f"{platform.machine()} CPU, 1 torch thread", "train_seconds": round(time.time() - t0, 1),
            "near_duplicates": {"untrained": before, "trained": near_duplicate_eval(clip)}, "history": hist}
    return save_preset(clip, out_dir, meta)
