"""Stage-1 VLM alignment on Ray Train: `lumo train vlm --config C [--set ...]`.

Reads top to bottom: build the model, freeze by stage (logged), build the data + sampler, then the
loop: global batch -> per-rank micro-batches -> token-weighted loss -> AdamW on the connector ->
quick eval / checkpoint (full eval, golden dump) through `ray.train.report`.

`run_loop` is the per-worker function. It talks to its runner through a small `Hooks` object, so
the same loop runs under TorchTrainer (DDP workers), as an in-process Ray Tune trial, and as the
plain PyTorch loop of the overhead benchmark.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from lumo_ray.config import LumoConfig, TrackingConfig, build, dump_config, to_dict
from lumo_ray.config.vlm import VLMConfig
from lumo_ray.runtime import rate_eta
from lumo_ray.tracking import open_tracker
from lumo_ray.storage import RunDir, download_dir, is_uri, latest_ray_checkpoint, locate, ray_storage, resolve
from lumo_ray.data.vlm_data import SequenceBuilder, StepSampler, collate, length_stats, prepare_data, to_device
from lumo_ray.eval.vlm_ablation import eval_loss, golden_captions
from lumo_ray.models.vlm import build_text, build_vlm, save_export, text_warmup, vlm_tokens


HOLD_S = 300  # train.hold_at_step: long enough for a test to kill a node, short enough to end a forgotten run


class Hooks:
    """Plain single-process runner (benchmark, tests): no reporting, no restore."""
    rank, world = 0, 1

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device or torch.device("cpu")

    def report(self, metrics: dict, ckpt_dir: Optional[str]) -> None:
        pass

    def sync(self) -> None:
        """Make the run directory durable where it lives (an object-store URI: upload what changed)."""

    def load_checkpoint(self, fn: Callable[[str], Any]) -> Any:
        return None


class RayTrainHooks(Hooks):
    def __init__(self, storage: str | None = None, run: Optional[RunDir] = None):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.storage = storage  # the run's Ray storage_path (local path or URI)
        self.run = run  # the run directory: rank 0 uploads it when it is a URI

    def report(self, metrics: dict, ckpt_dir: Optional[str]) -> None:
        import ray.train
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        if ckpt_dir:
            # logs first: a restart resumes from this checkpoint and continues the logs it pulls
            # (rows written twice are harmless: read_jsonl_last keeps the last per step)
            self.sync()
        ray.train.report(metrics, checkpoint=ckpt)

    def sync(self) -> None:
        if self.run is not None and self.rank == 0:
            self.run.push()

    def load_checkpoint(self, fn):
        import ray.train
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            # A worker killed outright (SIGKILL, lost node) can take reports the controller had not
            # registered yet with it; the checkpoints already persisted in the run's storage remain.
            last = latest_checkpoint(self.storage) if self.storage else None
            if last is None:
                return None
            with local_checkpoint(last) as d:
                return fn(d)
        with ckpt.as_directory() as d:
            return fn(d)


# ------------------------------------------------------------------------------------------------
# Run directory
# ------------------------------------------------------------------------------------------------

def prepare_run(cfg: VLMConfig, run_dir: str | Path, log: Callable[[str], None] = print,
                name: Optional[str] = None) -> tuple[VLMConfig, Path]:
    """Written once by the driver before workers start: the persisted eval split, the tiny LLM's
    text warm-up (when configured; the returned config then points llm.model at it, named inside
    `name`: where the run lives, its path or the URI `run_dir` is a staging copy of; default
    `run_dir`) and the resolved config copy."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    text = build_text(cfg)
    data = prepare_data(cfg.data, text, vlm_tokens(text), cfg.resampler.latents, cfg.vision.image_size,
                        run / "splits.json", preload=False)
    if cfg.llm.text_warmup_steps > 0 and cfg.llm.model == "tiny":
        builder = SequenceBuilder(text, vlm_tokens(text), cfg.resampler.latents, cfg.data)
        warm = text_warmup(cfg, text, [builder.text_in_span(s) for s in data.train], run / "llm_text_warm", log)
        cfg.llm.model = str(locate(name or run) / warm.relative_to(run).as_posix())
        cfg.llm.text_warmup_steps = 0
    dump_config(LumoConfig(vlm=cfg), run)
    return cfg, run


def lr_lambda(cfg: VLMConfig) -> Callable[[int], float]:
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        frac = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _append(path: Path, obj: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(obj, sort_keys=True) + "\n")


def read_jsonl_last(path: Path, key: str = "step") -> list[dict]:
    """Rows of a log that restarts may have rewritten: the last row per key, in key order."""
    if not path.exists():
        return []
    rows: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r[key]] = r
    return [rows[k] for k in sorted(rows)]


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def run_loop(cfg: VLMConfig, run_dir: str | Path, hooks: Hooks, log: Callable[[str], None] = print,
             bench: Optional[dict] = None, tracking: Optional[TrackingConfig] = None) -> dict:
    """Train the connector; returns the final metrics (rank 0's view). tracking: TensorBoard / MLflow
    of rank 0 (lumo_ray/tracking.py; None: off)."""
    t, run = cfg.train, Path(run_dir)
    rank, world, device = hooks.rank, hooks.world, hooks.device
    dist = None
    if world > 1:
        import torch.distributed as dist
    say = log if rank == 0 else (lambda *_: None)
    torch.manual_seed(t.seed * 1000 + rank)
    np.random.seed(t.seed * 1000 + rank)
    random.seed(t.seed * 1000 + rank)

    text = build_text(cfg)
    model = build_vlm(cfg, text, seed=t.seed)
    counts = model.apply_stage(t.stage)
    say(f"[vlm] stage {t.stage}: trainable {counts['trainable']:,} params (connector), frozen "
        f"{counts['frozen']:,} (vision {counts['vision']['frozen']:,}, llm {counts['llm']['frozen']:,})")
    model.to(device).train()
    split_path = run / "splits.json"
    if world > 1 and not split_path.exists():
        raise FileNotFoundError(f"{split_path}: the driver writes the split before starting workers (prepare_run)")
    data = prepare_data(cfg.data, text, model.tokens, model.n_visual, cfg.vision.image_size, split_path)
    n_buckets = len(data.split["edges"]) + 1
    sampler = StepSampler(len(data.train), t.global_batch_size, world, t.grad_accum, t.seed)
    connector: torch.nn.Module = model.connector
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        connector = DDP(model.connector, forward_sync_buffers=False,  # the connector has no buffers to sync
                        device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    autocast = t.bf16 and device.type == "cuda"

    def restore(d: str) -> int:
        st = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
        model.connector.load_state_dict(st["connector"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"][rank] if rank < len(st["rng"]) else st["rng"][0])
        return int(st["step"])

    start = hooks.load_checkpoint(restore)
    if start is None and t.resume_from:
        with local_checkpoint(t.resume_from) as d:
            start = restore(d)
    start = start or 0
    if start:
        say(f"[vlm] resumed at step {start} (epoch {sampler.epoch_of(start)}, batch "
            f"{start % sampler.steps_per_epoch} of {sampler.steps_per_epoch})")

    def save_checkpoint(step: int) -> Optional[str]:
        rng = [_rng_state()]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state())
        if rank != 0:
            return None
        d = run / "ckpt_tmp" / f"step_{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"connector": model.connector.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": rng, "step": step,
                    "data_position": {"epoch": sampler.epoch_of(step), "batch_in_epoch": step % sampler.steps_per_epoch,
                                      "global_batch_size": t.global_batch_size, "seed": t.seed},
                    "config": to_dict(cfg)}, d / "state.pt")
        (d / "meta.json").write_text(json.dumps({"step": step, "config": to_dict(cfg)}, indent=1) + "\n")
        return str(d)

    last_epoch_logged = -1
    step_times, data_times = [], []
    t_run = time.time()  # progress lines: steps/s and ETA since this (re)start
    tracker = open_tracker(run, tracking, "vlm", to_dict(cfg), rank)
    final: dict = {}
    stop = min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps
    for step in range(start, stop):
        epoch = sampler.epoch_of(step)
        if epoch != last_epoch_logged and rank == 0:
            st = {"epoch": epoch, **length_stats(data.train)}
            _append(run / "epochs.jsonl", st)
            if step == start:  # the same data every epoch: said once, every epoch's stats in epochs.jsonl
                say(f"[vlm] epoch {epoch}: {st['n']} samples, truncated {st['truncated_pct']:.2f}%, zero-label "
                    f"{st['zero_label_pct']:.2f}%, avg label tokens {st['avg_label_tokens']:.2f}")
        last_epoch_logged = epoch
        if t.fail_at_step is not None and step == t.fail_at_step and rank == 0:
            marker = run / ".failed_once"
            if not marker.exists():
                marker.write_text(f"killed at step {step}\n")
                hooks.sync()  # the restarted worker may stage a fresh copy of a URI run directory
                # A real crash, not an exception: the worker process dies (SIGKILL) mid-run.
                os.kill(os.getpid(), signal.SIGKILL)
        if t.hold_at_step is not None and step == t.hold_at_step and rank == 0:
            marker = run / ".held_once"
            if not marker.exists():
                marker.write_text(f"held at step {step}\n")
                hooks.sync()
                time.sleep(HOLD_S)  # the other ranks wait in their next collective

        t0 = time.perf_counter()
        batches = [to_device(collate([data.train[i] for i in idx], data.images, model.tokens.pad), device)
                   for idx in sampler.micro_batches(step, rank)]
        n_tok = torch.tensor([float(sum(int((b["labels"] != -100).sum()) for b in batches))], device=device)
        if world > 1:
            dist.all_reduce(n_tok)
        t1 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for m, b in enumerate(batches):
            sync = m == len(batches) - 1 or world == 1
            ctx = contextlib.nullcontext() if sync else connector.no_sync()
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                visual = model.encode_images(b["pixel_values"], connector)
                ls, _ = model.token_losses(b, visual=visual)
                # token-weighted over the global batch; DDP averages over ranks, so scale by world
                (ls.sum() * world / n_tok.clamp(min=1)).backward()
            loss_sum += ls.sum().detach().float()
        gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = float(loss_sum / n_tok.clamp(min=1))
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        data_times.append(t1 - t0)
        done = step + 1
        if rank == 0:
            _append(run / "steps.jsonl", {"step": done, "loss": loss, "lr": sched.get_last_lr()[0],
                                          "grad_norm": float(gnorm), "tokens": int(n_tok.item())})
            if tracker is not None:
                tracker.log(done, {"loss": loss, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm)})
            if done % max(1, t.log_every) == 0 or done == 1:
                say(f"[vlm] step {done}/{t.max_steps} loss {loss:.4f} lr {sched.get_last_lr()[0]:.2e} "
                    f"({rate_eta(done, stop, t_run, start)})")
        is_ckpt = done == stop or (t.checkpoint_every and done % t.checkpoint_every == 0)
        if t.eval_every and done % t.eval_every == 0 and not is_ckpt:
            q = eval_loss(model, data.eval[: t.quick_eval_size], data.images, t.eval_batch_size, n_buckets,
                          device, autocast)
            if rank == 0:
                _append(run / "evals.jsonl", {"step": done, "kind": "quick", **q})
                if tracker is not None:
                    tracker.log(done, {"quick_eval_loss": q["loss"]})
                say(f"[vlm] step {done} quick eval loss {q['loss']:.4f} ({q['samples']} samples)")
        if is_ckpt:
            ev = eval_loss(model, data.eval, data.images, t.eval_batch_size, n_buckets, device, autocast)
            metrics = {"step": done, "train_loss": loss, "eval_loss": ev["loss"], "epoch": epoch,
                       "eval_buckets": {b: v["loss"] for b, v in ev["buckets"].items()}}
            if rank == 0:
                _append(run / "evals.jsonl", {"step": done, "kind": "full", **ev})
                if tracker is not None:
                    tracker.log(done, {"eval_loss": ev["loss"]})
                gold = golden_captions(model, data.golden, data.images, text, device=device,
                                       max_new_tokens=cfg.data.max_seq_len - min((s.prompt_len for s in data.golden), default=0))
                gdir = run / "golden"
                gdir.mkdir(exist_ok=True)
                (gdir / f"step_{done:06d}.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
                say(f"[vlm] step {done} eval loss {ev['loss']:.4f} over {ev['samples']} samples; golden "
                    f"{gold[0]['id'] if gold else '-'}: {gold[0]['generated'] if gold else ''!r}")
            ckpt = save_checkpoint(done)
            hooks.report(metrics, ckpt)
            if ckpt:
                shutil.rmtree(ckpt, ignore_errors=True)  # Ray copied it to storage
            final = metrics
    warm = slice(3, None) if len(step_times) > 6 else slice(None)
    timing = {"step_time_s": float(np.mean(step_times[warm])) if step_times else None,
              "data_time_s": float(np.mean(data_times[warm])) if data_times else None}
    if bench is not None:
        bench.update(timing, step_times=step_times, data_times=data_times)
    if tracker is not None:
        tracker.close()
    if rank == 0 and stop == t.max_steps:
        save_export(model, cfg, run / "export", extra={"step": stop})
    if rank == 0:
        doc = {"final": final, "params": counts, "timing": timing, "world_size": world,
               "steps": read_jsonl_last(run / "steps.jsonl"),
               "evals": read_jsonl_last(run / "evals.jsonl", key="step"),
               "epochs": read_jsonl_last(run / "epochs.jsonl", key="epoch"),
               "data": data.stats, "split": {"edges": data.split["edges"], "bucket_counts": data.split["bucket_counts"]}}
        (run / "metrics.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return final


# ------------------------------------------------------------------------------------------------
# Ray Train driver
# ------------------------------------------------------------------------------------------------

def train_func(config: dict) -> None:
    """The TorchTrainer worker entry point."""
    from pipelines.ray_env import quiet_train_worker

    quiet_train_worker()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = build(VLMConfig, config["vlm"], "train_loop_config", prefix="vlm.")
    run = RunDir(config["run_dir"])  # a URI run directory: this worker's staging copy
    run.pull()
    hooks = RayTrainHooks(config["storage"], run)  # logs and golden captions reach a URI with each checkpoint
    tracking = build(TrackingConfig, config["tracking"], "train_loop_config", prefix="tracking.") \
        if config.get("tracking") else None
    run_loop(cfg, run.local, hooks, bench=None, tracking=tracking)
    hooks.sync()
    run.discard()


def train_vlm(cfg: LumoConfig | VLMConfig, address: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Run stage-1 alignment with TorchTrainer; returns {"run_dir", "metrics", "checkpoint", "export"}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_env import init_ray, train_logging

    vcfg = copy.deepcopy(cfg.vlm if isinstance(cfg, LumoConfig) else cfg)
    if vcfg.data.path:  # Ray Train workers run in their own working directory: hand them absolute paths
        vcfg.data.path = str(Path(vcfg.data.path).resolve())
    t = vcfg.train
    stage = RunDir(t.out)  # a URI run directory is written in a local staging copy, then pushed
    if t.resume_from:
        t.resume_from = resolve(t.resume_from)
    vcfg, _ = prepare_run(vcfg, stage.local, log, name=str(stage))
    stage.push()
    storage = resolve(t.storage_path) if t.storage_path else str(stage.loc / "ray")
    init_ray(address)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"vlm": to_dict(vcfg), "run_dir": str(stage), "storage": storage, "threads": t.cpus_per_worker,
                           "tracking": to_dict(cfg.tracking if isinstance(cfg, LumoConfig) else TrackingConfig())},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(**ray_storage(storage), name="train",
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), logging_config=train_logging()))
    result = trainer.fit()
    stage.discard()
    run = stage.loc
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    out = {"run_dir": str(run), "metrics": metrics,
           "checkpoint": result.checkpoint.path if result.checkpoint else None,
           "export": str(run / "export") if (run / "export").is_dir() else None}
    fin = metrics.get("final", {})
    log(f"[vlm] done: step {fin.get('step')}, eval loss {fin.get('eval_loss')}, run dir {run}")
    return out


def latest_checkpoint(storage: str | Path) -> Optional[str]:
    """The newest checkpoint (path or URI) in a run's Ray storage (`vlm.train.storage_path`, by
    default `<out>/ray`)."""
    last = latest_ray_checkpoint(storage, "train", "state.pt")
    return str(last) if last else None


@contextlib.contextmanager
def local_checkpoint(p: str) -> Iterator[str]:
    """A local directory holding the checkpoint `p`: itself, or a temporary download of a URI."""
    if not is_uri(p):
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="lumo-ckpt-") as d:
        yield str(download_dir(p, d))

