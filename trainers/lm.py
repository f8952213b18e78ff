"""`lumo train lm`: stage-0 pretraining of a Qwen3-architecture causal LM on Ray Train (DDP)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lumo_ray.config import LumoConfig, dump_config, to_dict
from lumo_ray.config.lm import TrainConfig
from lumo_ray.eval.perplexity import is_eval_text, pack  # (`lumo eval perplexity` splits and packs the same)
from lumo_ray.integrity import write_manifest
from lumo_ray.storage import staged_dir
from lumo_ray.tracking import open_tracker

from .checkpoint import load_state, resolve_resume, restore_training, save_training
from .context import RayContext
from .fsdp import full_state
from .launch import launch, storage_of, write_json
from .loop import Due, Workload, checkpoint_activations, make_scheduler, micro_batch, rng_state, run_steps, seed_all


# ------------------------------------------------------------------------------------------------
# Stage 0: base LM
# ------------------------------------------------------------------------------------------------

def load_lm_tokenizer(name: str):
    from lumo_ray.codecs.text import TINY_TOKENIZER_DIR
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR) if name == "tiny" else name)


def lm_texts(inputs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Train/eval texts: a text goes to eval when its hash falls under eval_fraction (stable split)."""
    from lumo_ray.codecs.text import read_training_texts

    if not inputs:
        raise ValueError("lm.inputs is empty: give manifest.jsonl or text files")
    train, ev = [], []
    for p in inputs:
        for t in read_training_texts(p):
            (ev if is_eval_text(t, eval_fraction) else train).append(t)
    if not train or not ev:
        raise ValueError(f"lm.inputs {inputs}: {len(train)} train and {len(ev)} eval texts; need both "
                         f"(adjust lm.eval_fraction={eval_fraction})")
    return train, ev


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab: int) -> float:
    """Perplexity on the eval targets of a unigram model of the train tokens (add-one smoothed): what
    an LM scores that learned word frequencies and nothing about order (the demo's yardstick)."""
    counts = torch.bincount(train_blocks[:, 1:].reshape(-1), minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(torch.exp(-logp[eval_blocks[:, 1:].reshape(-1)].mean()))


class BlockStream:
    """This rank's share of the train blocks, a seeded permutation per epoch; (epoch, pos) is its state."""

    def __init__(self, n: int, seed: int, rank: int, world: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.pos, self.cur = epoch, pos, self.order(epoch)

    def order(self, ep: int) -> list[int]:
        perm = np.random.default_rng([self.seed, ep]).permutation(self.n).tolist()
        per_rank = math.ceil(len(perm) / self.world)
        perm = (perm * self.world)[: per_rank * self.world]
        return perm[self.rank::self.world]

    def take(self, k: int) -> list[int]:
        idx = []
        while len(idx) < k:
            if self.pos >= len(self.cur):
                self.epoch, self.pos = self.epoch + 1, 0
                self.cur = self.order(self.epoch)
            idx.append(self.cur[self.pos])
            self.pos += 1
        return idx


def lm_eval(model, eval_blocks: torch.Tensor, ctx) -> dict:
    """Eval loss and perplexity over every eval block (split over ranks, summed). Every rank runs the
    same number of forwards (a sharded model gathers its layers in each one): a rank past the last
    block repeats it and does not count it."""
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    n = len(eval_blocks)
    with torch.no_grad():
        for k in range(math.ceil(n / ctx.world_size)):
            i = ctx.rank + k * ctx.world_size
            b = eval_blocks[min(i, n - 1): min(i, n - 1) + 1].to(ctx.device)
            logits = model(input_ids=b[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                                     reduction="sum")
            if i < n:
                tot += torch.tensor([loss.item(), b[:, 1:].numel()], dtype=torch.float64)
    tot = ctx.all_reduce(tot.to(ctx.device)).cpu()
    model.train()
    el = float(tot[0] / max(1, tot[1]))
    return {"eval_loss": el, "perplexity": math.exp(min(el, 50))}


def lm_step(model, blocks: torch.Tensor, stream: BlockStream, per: int, t: TrainConfig, opt, sched, ctx) -> float:
    """One optimizer step over grad_accum micro-batches of `per` blocks; returns the mean loss."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(t.grad_accum):
        b = blocks[stream.take(per)].to(ctx.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.bf16 and ctx.device.type == "cuda"):
            logits = model(input_ids=b[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
        (loss / t.grad_accum).backward()
        total += loss.item() / t.grad_accum
    if t.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
    opt.step()
    sched.step()
    return total


class BaseLM(Workload):
    """The base LM as the one loop's workload: the model built for the worker's strategy, AdamW, the
    packed blocks and this rank's block stream, resumed where train.resume / Ray's restart says."""

    def __init__(self, cfg: LumoConfig, ctx, run_dir: Path, say):
        c, t = cfg.lm, cfg.lm.train
        self.cfg, self.ctx, self.run_dir, self.t = cfg, ctx, run_dir, t
        self.tok = load_lm_tokenizer(c.tokenizer)
        train_texts, eval_texts = lm_texts(c.inputs, c.eval_fraction)
        self.train_blocks, self.eval_blocks = pack(train_texts, self.tok, c.seq_len), pack(eval_texts, self.tok, c.seq_len)
        self.model, self.build, self.counts, self.meta = build_lm(c, self.tok, ctx)
        say(f"base LM {c.preset}: {self.counts['total']:,} params, vocab {len(self.tok)}, {len(self.train_blocks)} "
            f"train / {len(self.eval_blocks)} eval blocks of {c.seq_len}")
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=t.lr,
                                     weight_decay=t.weight_decay)
        self.sched = make_scheduler(self.opt, t)
        self.per = micro_batch(t, ctx.world_size)
        self.start, epoch, pos = resume_lm(t, run_dir, ctx, self.model, self.opt, self.sched, say)
        self.stream = BlockStream(len(self.train_blocks), t.seed, ctx.rank, ctx.world_size, epoch, pos)
        self.metrics: dict = {}  # the last eval's report row
        self.model.train()

    def train_step(self, step: int) -> dict:
        return {"step": step + 1, "loss": lm_step(self.model, self.train_blocks, self.stream, self.per, self.t,
                                                  self.opt, self.sched, self.ctx)}

    def evaluate(self, done: int, due: Due) -> dict:
        return lm_eval(self.model, self.eval_blocks, self.ctx) if due.eval else {}

    def save(self, done: int) -> Optional[Path]:
        model, t = self.model, self.t
        state = {"strategy": t.strategy, "scheduler": self.sched.state_dict(), "rng": rng_state(), "step": done,
                 "data": {"epoch": self.stream.epoch, "pos": self.stream.pos}, "token_space_hash": None,
                 "config": to_dict(self.cfg)}
        return save_training(self.ctx, self.run_dir, done, t.strategy == "fsdp", model, self.opt, state,
                             lambda: {"model": getattr(model, "module", model).state_dict()})

    def after_step(self, done: int, due: Due, rep: dict, ck: Optional[Path]) -> dict:
        if "eval_loss" in rep:
            self.metrics = rep
        return {}

    def line(self, done: int, rep: dict, rate) -> str:
        return (f"lm step {done}/{self.t.steps} loss {rep['loss']:.4f}"
                + (f" eval {rep['eval_loss']:.4f} ppl {rep['perplexity']:.2f}" if "eval_loss" in rep else "")
                + f" ({rate(done)})")


def lm_loop(cfg: LumoConfig, ctx, log=print) -> dict:
    """Base LM training on one worker (rank ctx.rank of ctx.world_size): the one loop over BaseLM."""
    from lumo_ray.storage import RunDir

    c, t = cfg.lm, cfg.lm.train
    run = RunDir(c.out)  # a URI run directory is staged locally and pushed at the end
    run_dir = run.local
    torch.set_num_threads(t.threads)
    seed_all(t.seed)
    say = log if ctx.rank == 0 else (lambda *a, **k: None)
    w = BaseLM(cfg, ctx, run_dir, say)
    tracker = open_tracker(run_dir, cfg.tracking, "lm", to_dict(cfg.lm), ctx.rank)
    steps = run_steps(w, ctx, t, t.steps, run_dir, tracker, say)
    export_lm(w.model, w.build, w.tok, run_dir / "export", ctx, t.strategy == "fsdp", w.meta)
    metrics = w.metrics
    if ctx.rank == 0:
        tracker.close()
        history = steps.history
        metrics = {**metrics, "train_loss": history[-1] if history else None, "loss_history": history,
                   "unigram_perplexity": unigram_perplexity(w.train_blocks, w.eval_blocks, len(w.tok)),
                   "params": w.counts, "steps": steps.step, "seconds": steps.secs, "export": str(run.loc / "export")}
        write_json(run_dir / "metrics.json", metrics)
        run.push()
    run.discard()
    return metrics


def build_lm(c, tok, ctx) -> tuple[torch.nn.Module, Callable, dict, bool]:
    """(the model prepared for this worker's strategy, its builder, parameter counts, meta-built?). Under
    fsdp with train.meta_init it is built on the meta device and each rank fills its own shards."""
    from lumo_ray.models.base_lm import build_base_lm, count_params
    from lumo_ray.models.meta_init import meta_build

    t = c.train

    def build():
        return build_base_lm(c.preset, len(tok), seed=t.seed, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                             overrides=c.arch)
    meta = t.strategy == "fsdp" and t.meta_init
    model, fill = meta_build(build, t.seed) if meta else (build(), None)
    counts = count_params(model)
    checkpoint_activations(model, t.activation_checkpointing)
    model = ctx.prepare(model, t.strategy, t.bf16)
    if fill is not None:
        fill(model, ctx.device)
    return model, build, counts, meta


def resume_lm(t: TrainConfig, run_dir: Path, ctx, model, opt, sched, log) -> tuple[int, int, int]:
    """(step, epoch, position in the epoch) of the checkpoint resumed (train.resume / Ray's restart), its
    weights, optimizer, scheduler and RNG restored; (0, 0, 0) on a fresh run."""
    ck = resolve_resume(t.resume, run_dir, ctx, log if ctx.rank == 0 else (lambda *_: None))
    if ck is None:
        return 0, 0, 0
    st = load_state(ck)
    restore_training(ck, st, "lm.train", t.strategy == "fsdp", model, opt, sched,
                     lambda s: getattr(model, "module", model).load_state_dict(s["model"]))
    return st["step"], st["data"]["epoch"], st["data"]["pos"]


def export_lm(model, build: Callable, tok, export: Path, ctx, sharded: bool, meta: bool) -> None:
    """The trained base LM as a plain HF folder on rank 0 (a meta-built run: each weight gathered in turn,
    every rank taking part; fsdp: the gathered weights in a fresh copy), its digests last."""
    from lumo_ray.models.sharded_export import save_sharded_pretrained

    m = getattr(model, "module", model)
    if meta and ctx.rank != 0:  # each weight gathered in turn: rank 0 writes it
        save_sharded_pretrained(model, None)
    elif sharded and not meta:  # the export is a plain model: the gathered weights in a fresh copy
        full = full_state(model)
        if ctx.rank == 0:
            m = build()
            m.load_state_dict(full)
    if ctx.rank != 0:
        return
    with staged_dir(export) as tmp:  # HF's writes land in a folder of ours, then move in (no symlink followed)
        if meta:
            save_sharded_pretrained(model, tmp)
        else:
            m.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        write_manifest(tmp)  # last: the digests of what was written (lumo_ray/integrity.py)


def _lm_worker(config: dict) -> None:
    lm_loop(config["cfg"], RayContext())


def run_lm(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """`lumo train lm`: Ray Train DDP job; returns metrics.json of the run directory."""
    from lumo_ray.storage import locate, resolve

    cfg.lm.out = resolve(cfg.lm.out)  # absolute paths or URIs: workers run elsewhere
    cfg.lm.inputs = [resolve(p) for p in cfg.lm.inputs]
    if cfg.lm.train.storage_path:
        cfg.lm.train.storage_path = resolve(cfg.lm.train.storage_path)
    dump_config(cfg, cfg.lm.out)
    launch(_lm_worker, {"cfg": cfg}, cfg.lm.train, storage_of(cfg.lm.train, cfg.lm.out), "lm", address,
           section="lm.train")
    m = json.loads((locate(cfg.lm.out) / "metrics.json").read_text())
    log(f"base LM: eval loss {m['eval_loss']:.4f}, perplexity {m['perplexity']:.2f}; export {m['export']}")
    return m
