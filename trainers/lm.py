"""`lumo train lm`: stage-0 pretraining of a Qwen3-architecture causal LM on Ray Train (DDP), plus the
training machinery the token LM shares: worker context (local or Ray Train), warmup + cosine, RNG
capture, checkpoints, and the TorchTrainer launcher.

The training loops are plain functions of a context, so the same code runs in-process (tests, Tune
trials) and inside Ray Train workers; only `RayContext` and `launch` touch Ray.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from lumo_ray.config import LumoConfig, dump_config, to_dict
from lumo_ray.config.lm import TrainConfig
from lumo_ray.runtime import rate_eta
from lumo_ray.tracking import open_tracker

CKPT_STATE = "state.pt"


# ------------------------------------------------------------------------------------------------
# Worker context
# ------------------------------------------------------------------------------------------------

class LocalContext:
    """One process, no Ray: tests, Tune trials and notebooks."""
    rank, world_size = 0, 1

    def __init__(self, device: str = "cpu", checkpoint: Optional[Path] = None, on_report: Callable | None = None):
        self.device = torch.device(device)
        self._ckpt = checkpoint
        self.on_report = on_report

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def report(self, metrics: dict, ckpt_dir: Optional[Path] = None) -> None:
        if self.on_report:
            self.on_report(metrics, ckpt_dir)

    def restored_checkpoint(self) -> Optional[Path]:
        return self._ckpt


class RayContext:
    """Inside a Ray Train worker: DDP via prepare_model, reports on every rank."""

    # A Ray Train report costs a round trip through the controller: report on log/eval/checkpoint
    # steps only (the same steps on every rank), not on every step.
    report_every_step = False

    def __init__(self):
        import ray.train
        import ray.train.torch

        from pipelines.ray_env import quiet_train_worker

        quiet_train_worker()
        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def report(self, metrics: dict, ckpt_dir: Optional[Path] = None) -> None:
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None and self.rank == 0 else None
        self._train.report(metrics, checkpoint=ckpt)

    def restored_checkpoint(self) -> Optional[Path]:
        ck = self._train.get_checkpoint()
        if ck is None:
            return None
        return Path(ck.to_directory())


# ------------------------------------------------------------------------------------------------
# Optimisation helpers
# ------------------------------------------------------------------------------------------------

def lr_lambda(warmup: int, steps: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        prog = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def make_scheduler(opt: torch.optim.Optimizer, t: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))


def micro_batch(t: TrainConfig, world_size: int) -> int:
    per = t.global_batch // (world_size * t.grad_accum)
    if per < 1 or per * world_size * t.grad_accum != t.global_batch:
        raise ValueError(f"global_batch {t.global_batch} is not divisible by num_workers {world_size} x "
                         f"grad_accum {t.grad_accum}")
    return per


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def save_checkpoint(run_dir: Path, step: int, state: dict, extra_files: dict[str, str] | None = None,
                    keep: int = 2) -> Path:
    """run_dir/checkpoints/step-NNNNNNN/{state.pt, meta.json, ...}; written to a temp name, then renamed."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / CKPT_STATE)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    (tmp / "meta.json").write_text(json.dumps({"step": step, "token_space_hash": state.get("token_space_hash")}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    cks = sorted((Path(run_dir) / "checkpoints").glob("step-*"))
    return cks[-1] if cks else None


def resolve_resume(t: TrainConfig, run_dir: Path, ctx) -> Optional[Path]:
    """Ray's restored checkpoint (worker restart) wins; else train.resume ('auto' or a path)."""
    ck = ctx.restored_checkpoint()
    if ck is not None:
        return ck
    if t.resume == "auto":
        return latest_checkpoint(run_dir)
    if t.resume:
        from lumo_ray.storage import download_dir, is_uri

        p = download_dir(t.resume, tempfile.mkdtemp(prefix="lumo-resume-")) if is_uri(t.resume) else Path(t.resume)
        if not (p / CKPT_STATE).exists():
            raise FileNotFoundError(f"train.resume={t.resume}: no {CKPT_STATE} there")
        return p
    return None


def launch(worker_fn: Callable, cfg: LumoConfig, t: TrainConfig, run_dir: str | Path, name: str,
           address: Optional[str] = None):
    """Run worker_fn({'cfg': cfg}) on Ray Train workers (DDP); returns the Ray Train Result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_env import init_ray, train_logging

    from lumo_ray.storage import locate

    init_ray(address)
    # train.storage_path may be an object-store URI: hand Ray the filesystem and the bare path.
    store = locate(t.storage_path) if t.storage_path else locate(run_dir) / "ray"
    trainer = TorchTrainer(
        worker_fn, train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(storage_path=store.path, storage_filesystem=None if store.is_local else store.fs,
                             name=name, failure_config=FailureConfig(max_failures=t.max_failures),
                             logging_config=train_logging()))
    return trainer.fit()


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


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
            h = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            (ev if h < eval_fraction else train).append(t)
    if not train or not ev:
        raise ValueError(f"lm.inputs {inputs}: {len(train)} train and {len(ev)} eval texts; need both "
                         f"(adjust lm.eval_fraction={eval_fraction})")
    return train, ev


def pack(texts: list[str], tok, seq_len: int) -> torch.Tensor:
    """Concatenate text + eos and cut into [N, seq_len + 1] blocks (inputs and shifted targets)."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_special_tokens=False) + [eos]
    n = len(ids) // (seq_len + 1)
    if n == 0:
        reps = (seq_len + 1) // max(1, len(ids)) + 1
        ids, n = ids * reps, 1
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab: int) -> float:
    """Perplexity on the eval targets of a unigram model of the train tokens (add-one smoothed): what
    an LM scores that learned word frequencies and nothing about order (the demo's yardstick)."""
    counts = torch.bincount(train_blocks[:, 1:].reshape(-1), minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(torch.exp(-logp[eval_blocks[:, 1:].reshape(-1)].mean()))


def lm_loop(cfg: LumoConfig, ctx, log=print) -> dict:
    """Base LM training on one worker (rank ctx.rank of ctx.world_size)."""
    from lumo_ray.models.base_lm import build_base_lm, count_params

    from lumo_ray.storage import RunDir

    c, t = cfg.lm, cfg.lm.train
    run = RunDir(c.out)  # a URI run directory is staged locally and pushed at the end
    run_dir = run.local
    torch.set_num_threads(t.threads)
    seed_all(t.seed)
    tok = load_lm_tokenizer(c.tokenizer)
    train_texts, eval_texts = lm_texts(c.inputs, c.eval_fraction)
    train_blocks, eval_blocks = pack(train_texts, tok, c.seq_len), pack(eval_texts, tok, c.seq_len)
    model = build_base_lm(c.preset, len(tok), seed=t.seed, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                          overrides=c.arch)
    counts = count_params(model)
    if ctx.rank == 0:
        log(f"base LM {c.preset}: {counts['total']:,} params, vocab {len(tok)}, {len(train_blocks)} train / "
            f"{len(eval_blocks)} eval blocks of {c.seq_len}")
    model = ctx.prepare(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    sched = make_scheduler(opt, t)
    per = micro_batch(t, ctx.world_size)
    step, pos, epoch = 0, 0, 0
    ck = resolve_resume(t, run_dir, ctx)
    if ck is not None:
        st = torch.load(ck / CKPT_STATE, weights_only=False)
        getattr(model, "module", model).load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        step, epoch, pos = st["step"], st["data"]["epoch"], st["data"]["pos"]

    def order(ep: int) -> list[int]:
        perm = np.random.default_rng([t.seed, ep]).permutation(len(train_blocks)).tolist()
        per_rank = math.ceil(len(perm) / ctx.world_size)
        perm = (perm * ctx.world_size)[: per_rank * ctx.world_size]
        return perm[ctx.rank::ctx.world_size]

    def evaluate() -> dict:
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i in range(ctx.rank, len(eval_blocks), ctx.world_size):
                b = eval_blocks[i: i + 1].to(ctx.device)
                logits = model(input_ids=b[:, :-1]).logits.float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                                         reduction="sum")
                tot += torch.tensor([loss.item(), b[:, 1:].numel()], dtype=torch.float64)
        tot = ctx.all_reduce(tot.to(ctx.device)).cpu()
        model.train()
        el = float(tot[0] / max(1, tot[1]))
        return {"eval_loss": el, "perplexity": math.exp(min(el, 50))}

    cur = order(epoch)
    history, t0, metrics = [], time.time(), {}
    step0 = step  # a resumed run's rate counts the steps of this start
    tracker = open_tracker(run_dir, cfg.tracking, "lm", to_dict(cfg.lm), ctx.rank)
    model.train()
    while step < t.steps:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(t.grad_accum):
            idx = []
            while len(idx) < per:
                if pos >= len(cur):
                    epoch, pos = epoch + 1, 0
                    cur = order(epoch)
                idx.append(cur[pos])
                pos += 1
            b = train_blocks[idx].to(ctx.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.bf16 and ctx.device.type == "cuda"):
                logits = model(input_ids=b[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
            (loss / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
        if t.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
        opt.step()
        sched.step()
        step += 1
        history.append(total)
        last = step == t.steps
        rep: dict = {"step": step, "loss": total}
        if step % t.eval_every == 0 or last:
            rep.update(evaluate())
        ck_dir = None
        if (step % t.ckpt_every == 0 or last) and ctx.rank == 0:
            state = {"model": getattr(model, "module", model).state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "rng": rng_state(), "step": step,
                     "data": {"epoch": epoch, "pos": pos}, "token_space_hash": None, "config": to_dict(cfg)}
            ck_dir = save_checkpoint(run_dir, step, state)
        if ctx.rank == 0 and (step % t.log_every == 0 or last):
            log(f"lm step {step}/{t.steps} loss {total:.4f}" + (f" eval {rep['eval_loss']:.4f} ppl {rep['perplexity']:.2f}"
                                                              if "eval_loss" in rep else "")
                + f" ({rate_eta(step, t.steps, t0, step0)})")
        if getattr(ctx, "report_every_step", True) or last or any(
                step % k == 0 for k in (t.log_every, t.eval_every, t.ckpt_every)):
            ctx.report(rep, ck_dir)
        if tracker is not None:
            tracker.log(step, rep)
        metrics = rep if "eval_loss" in rep else metrics
    if ctx.rank == 0:
        tracker.close()
        export = run_dir / "export"
        m = getattr(model, "module", model)
        m.save_pretrained(str(export))
        tok.save_pretrained(str(export))
        metrics = {**metrics, "train_loss": history[-1] if history else None, "loss_history": history,
                   "unigram_perplexity": unigram_perplexity(train_blocks, eval_blocks, len(tok)),
                   "params": counts, "steps": step, "seconds": time.time() - t0, "export": str(run.loc / "export")}
        write_json(run_dir / "metrics.json", metrics)
        run.push()
    run.discard()
    return metrics


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
    launch(_lm_worker, cfg, cfg.lm.train, cfg.lm.out, "lm", address)
    m = json.loads((locate(cfg.lm.out) / "metrics.json").read_text())
    log(f"base LM: eval loss {m['eval_loss']:.4f}, perplexity {m['perplexity']:.2f}; export {m['export']}")
    return m
