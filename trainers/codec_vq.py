"""`lumo codec train-vq`: train the tiny VQ image codec on the one training loop, on Ray Train (one CPU
worker by default).

The loss, data and metrics are library code (lumo_ray/codecs/vq_train.py); `TinyVQ` is the loop's
workload (trainers/loop.py), `train_tiny_vq` the fit trainers/codec_fit.py launches on one Ray Train
worker, `run_codec_vq` the command's driver, which words the result.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from lumo_ray.codecs import image_vq
from lumo_ray.codecs.base import save_fit
from lumo_ray.codecs.vq_train import evaluate, lr_at, real_images, tiny_adapter, vq_step_loss
from lumo_ray.config import CodecTrainConfig, LumoConfig
from lumo_ray.data.synth import synthetic_shape_images
from lumo_ray.runtime import torch_threads

from trainers.codec_fit import fit_codec
from trainers.context import LocalContext
from trainers.loop import Cadence, Due, Workload, run_steps


class TinyVQ(Workload):
    """The tiny VQ as the one loop's workload: the preset's data-dependent init trained on synthetic
    shapes + procedural images, Adam under warmup + cosine (set per step), dead-code restarts every
    restart_every steps; one thread, a seeded data order and seeded restarts: byte-identical weights."""

    def __init__(self, c: CodecTrainConfig, log: Callable, report: Optional[Callable]):
        self.c, self.log, self.report_fn, self.t0 = c, log, report, time.time()
        self.model = model = image_vq.tiny_init(c.seed, c.codebook_size, c.resolution)
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        prep = tiny_adapter(c.resolution, None)  # the tiny preset's prepare at this resolution
        syn = synthetic_shape_images(c.synth_images, c.synth_seed, prep)
        parts = [np.stack([x.pixels for x in syn])] if syn else []
        if c.procedural_images:
            parts.append(image_vq.procedural_images(c.procedural_images, c.resolution, c.procedural_seed))
        if not parts:
            raise ValueError("codec.synth_images and codec.procedural_images are both 0: nothing to train on")
        self.data = torch.from_numpy(np.concatenate(parts)) * 2 - 1
        self.eval_images = synthetic_shape_images(c.eval_images, c.eval_seed, prep)
        self.real = real_images(c.real_data, c.max_real_images, c.resolution)
        log(f"[codec] tiny VQ: {sum(p.numel() for p in model.parameters())} params, {len(self.data)} train images "
            f"({len(syn)} synthetic seed {c.synth_seed}, {c.procedural_images} procedural), {len(self.eval_images)} "
            f"eval, {len(self.real)} real; {c.steps} steps x batch {c.batch}; data ready in {time.time() - self.t0:.1f}s")
        self.init = evaluate(model, c, self.eval_images, self.real)
        log(f"[codec] init: synth PSNR {self.init['synth_psnr']:.2f} dB SSIM {self.init['synth_ssim']:.3f}")
        self.opt = torch.optim.Adam(model.parameters(), lr=c.lr)
        self.gen = torch.Generator().manual_seed(c.seed)
        self.k = model.quantize.embedding.weight.shape[0]
        self.usage = torch.zeros(self.k, dtype=torch.long)
        self.perm, self.pos, self.restarts = torch.randperm(len(self.data), generator=self.gen), 0, 0
        self.hist: list[dict] = []

    def train_step(self, step: int) -> dict:
        c, done = self.c, step + 1
        if self.pos + c.batch > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
        x = self.data[self.perm[self.pos: self.pos + c.batch]]
        self.pos += c.batch
        for gr in self.opt.param_groups:
            gr["lr"] = lr_at(step, c)
        loss, lp, idx, zf = vq_step_loss(self.model, x, c.beta, c.fg_weight)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.usage += torch.bincount(idx, minlength=self.k)
        if c.restart_every and done % c.restart_every == 0 and done < c.steps:
            dead = (self.usage == 0).nonzero().flatten()
            if len(dead):
                pick = torch.randint(len(zf), (len(dead),), generator=self.gen)
                with torch.no_grad():
                    self.model.quantize.embedding.weight[dead] = zf[pick]
                self.restarts += len(dead)
            self.usage.zero_()
        return {"step": done, "loss": loss.item(), **lp}

    def logged(self, done: int) -> bool:
        """The history's steps: every log_every and the last (the first step's line is not in it)."""
        return done % self.c.log_every == 0 or done == self.c.steps

    def after_step(self, done: int, due: Due, rep: dict, ck: Optional[Path]) -> dict:
        if self.logged(done):
            self.hist.append(dict(rep))
        return {}

    def line(self, done: int, rep: dict, rate) -> str:
        psnr = 10 * math.log10(4.0 / max(rep["mse"], 1e-12))  # [-1, 1] pixels: peak-to-peak 2
        return (f"[codec] step {done}/{self.c.steps} loss {rep['loss']:.4f} (l1 {rep['l1']:.4f} mse {rep['mse']:.5f} "
                f"vq {rep['vq']:.4f}) train PSNR {psnr:.2f} dB, {self.restarts} code restarts, "
                f"{time.time() - self.t0:.0f}s")

    def report(self, ctx, done: int, due: Due, rep: dict, ck: Optional[Path]) -> None:
        if self.report_fn and self.logged(done):
            self.report_fn(dict(rep))


def train_tiny_vq(c: CodecTrainConfig, log: Callable = print, report: Callable | None = None,
                  out_dir: Path | None = None) -> tuple[Any, dict]:
    """Train the tiny VQ codec (one thread, c.threads); writes out_dir/model.safetensors and metrics.json
    when out_dir is given. Returns (model, metrics)."""
    with torch_threads(c.threads):
        w = TinyVQ(c, log, report)
        run_steps(w, LocalContext(), Cadence(c.log_every), c.steps, Path(out_dir or "."), None, log)
        model = w.model
        final = evaluate(model, c, w.eval_images, w.real)
        model.eval()
        seconds = time.time() - w.t0
        metrics = {**final, "init": w.init, "steps": c.steps, "seconds": seconds, "code_restarts": w.restarts,
                   "threads": c.threads, "history": w.hist, "params": int(sum(p.numel() for p in model.parameters()))}
        log(f"[codec] done in {seconds:.0f}s: synth eval PSNR {final['synth_psnr']:.2f} dB SSIM "
            f"{final['synth_ssim']:.3f} ({final['synth_codes_used']} codes used)"
            + (f"; real PSNR {final['real_psnr']:.2f} dB SSIM {final['real_ssim']:.3f}" if w.real else ""))
        if out_dir is not None:
            save_fit(out_dir, model, metrics, image_vq.save_weights, log)
        return model, metrics


def run_codec_vq(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """Train on Ray Train; returns the run's metrics.json (model.safetensors beside it)."""
    m = fit_codec(cfg, "codec", "trainers.codec_vq:train_tiny_vq", "codec_vq", "max_real_images",
                  "the tiny codec trains on exactly one worker (its dead-code restarts and data order are "
                  "single-stream)", address)
    c = cfg.codec
    log(f"tiny VQ codec: synthetic eval PSNR {m['synth_psnr']:.2f} dB SSIM {m['synth_ssim']:.3f}"
        + (f", real PSNR {m['real_psnr']:.2f} dB SSIM {m['real_ssim']:.3f}" if "real_psnr" in m else "")
        + f"; weights {Path(c.out) / 'model.safetensors'} (sha256 {m['weights_sha256'][:16]}...), "
          f"{m['seconds']:.0f}s")
    return m
