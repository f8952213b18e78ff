"""Stage-1 VLM alignment on Ray Train: `lumo train vlm --config C [--set ...]`.

Reads top to bottom: build the model, freeze by stage (logged), open the rank's micro-batch stream
(trainers/vlm_stream.py: decoded by Ray Data actors from the driver's data/train.arrow, in the
sampler's order), then the loop: per-rank micro-batches -> token-weighted loss -> AdamW on the
connector -> quick eval / checkpoint (full eval, golden dump) through `ray.train.report`.

`run_loop` is the per-worker function, over a trainers/context.py context, so the same loop runs under
TorchTrainer (DDP workers, RayContext), as an in-process Ray Tune trial and as the plain PyTorch loop
of the overhead benchmark (LocalContext). `Trainee` holds what it trains (model, data, optimizer) and
is the one loop's workload (trainers/loop.py run_steps): it reports its full eval with each checkpoint,
and its step line comes after the step's eval / checkpoint, as every workload's does.
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lumo_ray.config import LumoConfig, TrackingConfig, build, dump_config, to_dict
from lumo_ray.config.vlm import VLMConfig
from lumo_ray.tracking import open_tracker
from lumo_ray.storage import RunDir, locate, resolve, write_file
from lumo_ray.data.vlm_data import ImageStore, SequenceBuilder, StepSampler, prepare_data, to_device
from lumo_ray.data.vlm_records import RecordTable, StreamSpec, data_dir, read_plan, write_tables
from lumo_ray.eval.vlm_ablation import eval_loss, golden_captions
from lumo_ray.models.vlm import build_text, build_vlm, save_export, text_warmup, vlm_tokens

from .checkpoint import load_state, resolve_resume, restore_training, save_training
from .context import RayContext
from .fsdp import is_sharded
from .launch import launch, storage_of
from .loop import Due, Workload, checkpoint_activations, make_scheduler, rng_state, run_steps, seed_all
from .metrics import max_over_ranks, rss_gb
from .vlm_stream import micro_batches


# ------------------------------------------------------------------------------------------------
# Run directory
# ------------------------------------------------------------------------------------------------

def prepare_run(cfg: VLMConfig, run_dir: str | Path, log: Callable[[str], None] = print,
                name: Optional[str] = None) -> tuple[VLMConfig, Path]:
    """Written once by the driver before workers start: the persisted eval split, the samples as
    data/{train,eval}.arrow + data/plan.json (what the ranks read), the tiny LLM's text warm-up
    (when configured; the returned config then points llm.model at it, named inside `name`: where
    the run lives, its path or the URI `run_dir` is a staging copy of; default `run_dir`) and the
    resolved config copy."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    text = build_text(cfg)
    data = prepare_data(cfg.data, text, vlm_tokens(text), cfg.resampler.latents, cfg.vision.image_size,
                        run / "splits.json")
    write_tables(data, run)
    if cfg.llm.text_warmup_steps > 0 and cfg.llm.model == "tiny":
        builder = SequenceBuilder(text, vlm_tokens(text), cfg.resampler.latents, cfg.data)
        warm = text_warmup(cfg, text, [builder.text_in_span(s) for s in data.train], run / "llm_text_warm", log)
        cfg.llm.model = str(locate(name or run) / warm.relative_to(run).as_posix())
        cfg.llm.text_warmup_steps = 0
    dump_config(LumoConfig(vlm=cfg), run)
    return cfg, run


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

class Trainee(Workload):
    """The VLM as the one loop's workload: the model (stage-frozen), its data and step sampler, the
    connector (DDP-wrapped across ranks), AdamW with warmup + cosine; per step its row in steps.jsonl,
    the quick eval between checkpoints, the full eval (golden captions) at each, reported with it."""

    def __init__(self, cfg: VLMConfig, run: Path, ctx, say):
        t = cfg.train
        self.cfg, self.run, self.ctx, self.say, self.tracker = cfg, run, ctx, say, None
        self.final: dict = {}  # the last full eval's row: what a checkpoint reports, what the run returns
        self.step_times, self.data_times, self.pads, self.epoch_logged = [], [], [], -1
        self.text = build_text(cfg)
        self.model = build_vlm(cfg, self.text, seed=t.seed)
        self.counts = self.model.apply_stage(t.stage)
        say(f"[vlm] stage {t.stage}: trainable {self.counts['trainable']:,} params (connector), frozen "
            f"{self.counts['frozen']:,} (vision {self.counts['vision']['frozen']:,}, llm {self.counts['llm']['frozen']:,})")
        self.model.to(ctx.device).train()
        checkpoint_activations(self.model.llm, t.activation_checkpointing)
        # the driver's plan (prepare_run): the rank reads samples from data/*.arrow, never the whole dataset
        self.plan = read_plan(run)
        self.builder = SequenceBuilder(self.text, self.model.tokens, self.model.n_visual, cfg.data)
        ev = RecordTable(data_dir(run) / "eval.arrow")  # bounded by eval_size: tokenized here, images per batch
        self.eval = ev.samples(range(len(ev)), self.builder)
        gold = set(self.plan["golden"])
        self.golden_samples = [s for s in self.eval if s.id in gold]
        self.images = ImageStore(cfg.vision.image_size, keep=False)
        self.n_buckets = len(self.plan["edges"]) + 1
        self.sampler = StepSampler(self.plan["rows"]["train"], t.global_batch, ctx.world_size, t.grad_accum, t.seed)
        self.spec = StreamSpec(table=str(data_dir(run) / "train.arrow"), data=cfg.data, tokenizer=cfg.llm.tokenizer,
                               tokens=self.model.tokens, n_visual=self.model.n_visual,
                               image_size=cfg.vision.image_size, global_batch=t.global_batch,
                               world=ctx.world_size, accum=t.grad_accum, seed=t.seed, rank=ctx.rank)
        self.stream = iter(())
        self.connector: torch.nn.Module = self.model.connector
        self.sharded = t.strategy == "fsdp"
        if self.sharded:  # every rank then runs every forward (evals, golden captions) in lockstep
            self.model = ctx.prepare(self.model, "fsdp", t.bf16, forward_methods=("encode_images", "generate"))
        elif ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.connector = DDP(self.model.connector, forward_sync_buffers=False,  # the connector has no buffers
                                 device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.sched = make_scheduler(self.opt, t)
        self.autocast = t.bf16 and ctx.device.type == "cuda"

    def connector_names(self) -> set[str]:
        return {f"connector.{n}" for n, _ in self.model.connector.named_parameters()}

    def restore(self, ck: Path, rank: int) -> int:
        st = load_state(ck)
        restore_training(ck, st, "vlm.train", self.sharded, self.model, self.opt, self.sched,
                         lambda s: self.model.connector.load_state_dict(s["connector"]), self.connector_names(), rank)
        return int(st["step"])

    def open_stream(self, cfg: VLMConfig, start: int, stop: int) -> None:
        """This rank's micro-batches of steps [start, stop): a resumed run starts at its checkpoint's step."""
        self.stream = micro_batches(self.spec, cfg.data, start, stop)

    def next_batches(self, step: int, accum: int, device) -> list[dict]:
        out = []
        for micro in range(accum):
            b = next(self.stream)
            if (b["step"], b["micro"]) != (step, micro):  # the stream is ordered: anything else is a bug
                raise RuntimeError(f"vlm stream out of order: got step {b['step']} micro {b['micro']}, "
                                   f"want {step} / {micro}")
            out.append(to_device(b, device))
        return out

    def before_step(self, step: int) -> None:
        epoch = self.sampler.epoch_of(step)
        if epoch != self.epoch_logged and self.ctx.rank == 0:
            log_epoch(self, self.run, epoch, step == self.start, self.say)
        self.epoch_logged = epoch

    def train_step(self, step: int) -> dict:
        r = self.optimizer_step(step, self.ctx, self.cfg.train)
        self.pads.append(r["pad_fraction"])
        self.step_times.append(r.pop("step_s"))
        self.data_times.append(r.pop("data_s"))
        rep, self.step_loss = {"step": step + 1, **r}, r["loss"]
        if self.ctx.rank == 0:
            _append(self.run / "steps.jsonl", rep)
        return rep

    def evaluate(self, done: int, due: Due) -> dict:
        t, ctx = self.cfg.train, self.ctx
        if due.ckpt:
            self.final = full_eval(self.cfg, self, self.run, ctx, done, self.sampler.epoch_of(done - 1),
                                   self.step_loss, self.tracker, self.say)
        elif due.eval:
            quick_eval(self, t, self.run, done, ctx.rank, self.tracker, self.say)
        return {}

    def save(self, done: int) -> Optional[Path]:
        return self.checkpoint(self.cfg, done, self.run, self.ctx)

    def report(self, ctx, done: int, due: Due, rep: dict, ck: Optional[Path]) -> None:
        if due.ckpt:  # the full eval's row, with the checkpoint
            ctx.report(self.final, ck)
            if ck and ctx.rank == 0:
                shutil.rmtree(ck, ignore_errors=True)  # Ray copied it to storage

    def line(self, done: int, rep: dict, rate) -> str:
        return f"[vlm] step {done}/{self.cfg.train.steps} loss {rep['loss']:.4f} lr {rep['lr']:.2e} ({rate(done)})"

    def tracked(self, rep: dict) -> dict:
        return {k: rep[k] for k in ("loss", "lr", "grad_norm")}

    def optimizer_step(self, step: int, ctx, t) -> dict:
        """One optimizer step over this rank's micro-batches: token-weighted loss over the global batch."""
        t0 = time.perf_counter()
        m, d = self.model, ctx.device
        batches = self.next_batches(step, t.grad_accum, d)  # waits only when decode is behind the steps
        # label tokens (the loss's weight), padded positions, all positions: over every rank
        counts = ctx.all_reduce(torch.tensor([float(sum(int((b["labels"] != -100).sum()) for b in batches)),
                                              float(sum(int((b["attention_mask"] == 0).sum()) for b in batches)),
                                              float(sum(b["attention_mask"].numel() for b in batches))], device=d))
        n_tok = counts[:1]
        t1 = time.perf_counter()
        loss_sum = torch.zeros((), device=d)
        for i, b in enumerate(batches):
            sync = i == len(batches) - 1 or ctx.world_size == 1
            if self.sharded:  # gradients reduce-scattered on the last micro-batch only
                self.model.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or self.sharded else self.connector.no_sync()), \
                    torch.autocast(d.type, dtype=torch.bfloat16, enabled=self.autocast):
                ls, _ = m.token_losses(b, visual=m.encode_images(b["pixel_values"], self.connector))
                # token-weighted over the global batch; DDP averages over ranks, so scale by world
                (ls.sum() * ctx.world_size / n_tok.clamp(min=1)).backward()
            loss_sum += ls.sum().detach().float()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, t.clip)
        if is_sharded(gnorm):
            gnorm = gnorm.full_tensor()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        loss = float(ctx.all_reduce(loss_sum) / n_tok.clamp(min=1))
        return {"loss": loss, "lr": self.sched.get_last_lr()[0], "grad_norm": float(gnorm), "tokens": int(n_tok.item()),
                "pad_fraction": float(counts[1] / counts[2].clamp(min=1)), "data_s": t1 - t0,
                "step_s": time.perf_counter() - t0}

    def eval_on(self, samples: list, t) -> dict:
        return eval_loss(self.model, samples, self.images, t.eval_batch_size, self.n_buckets,
                         next(self.model.parameters()).device, self.autocast)

    def checkpoint(self, cfg: VLMConfig, step: int, run: Path, ctx) -> Optional[Path]:
        """Rank 0 writes the connector, optimizer, scheduler, every rank's RNG and the data position;
        fsdp: every rank its shard of the connector and of the optimizer state."""
        rng = [rng_state()]
        if ctx.world_size > 1:
            import torch.distributed as dist
            rng = [None] * ctx.world_size
            dist.all_gather_object(rng, rng_state())
        t, sp = cfg.train, self.sampler
        state = {"strategy": t.strategy, "scheduler": self.sched.state_dict(), "rng": rng, "step": step,
                 "config": to_dict(cfg),
                 "data_position": {"epoch": sp.epoch_of(step), "batch_in_epoch": step % sp.steps_per_epoch,
                                   "global_batch": t.global_batch, "seed": t.seed}}
        return save_training(ctx, run, step, self.sharded, self.model, self.opt, state,
                             lambda: {"connector": self.model.connector.state_dict()}, self.connector_names())

    def connector_state(self) -> dict[str, torch.Tensor]:
        """The connector's weights, whole (fsdp: gathered from the shards, a collective)."""
        return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu()
                for k, v in self.model.connector.state_dict().items()}

    def golden(self, cfg: VLMConfig, device) -> list[dict]:
        g = self.golden_samples
        return golden_captions(self.model, g, self.images, self.text, device=device,
                               max_new_tokens=cfg.data.max_seq_len - min((s.prompt_len for s in g), default=0))


def run_loop(cfg: VLMConfig, run_dir: str | Path, ctx, log: Callable[[str], None] = print,
             bench: Optional[dict] = None, tracking: Optional[TrackingConfig] = None) -> dict:
    """Train the connector: the one loop over Trainee; returns the final metrics (rank 0's view). ctx:
    trainers/context.py's context (LocalContext in one process, RayContext in a Ray Train worker);
    tracking: TensorBoard / MLflow of rank 0 (lumo_ray/tracking.py; None: off)."""
    t, run, rank = cfg.train, Path(run_dir), ctx.rank
    rss_start = rss_gb()  # the process before the model and the data: libraries, Ray
    say = log if rank == 0 else (lambda *_: None)
    seed_all(t.seed * 1000 + rank)
    tr = Trainee(cfg, run, ctx, say)
    ck = resolve_resume(t.resume, run, ctx, say)
    tr.start = start = tr.restore(ck, rank) if ck is not None else 0
    sp = tr.sampler
    if start:
        say(f"[vlm] resumed at step {start} (epoch {sp.epoch_of(start)}, batch {start % sp.steps_per_epoch} of "
            f"{sp.steps_per_epoch})")
    stop = min(t.steps, t.stop_after) if t.stop_after else t.steps
    tr.tracker = tracker = open_tracker(run, tracking, "vlm", to_dict(cfg), rank)
    tr.open_stream(cfg, start, stop)
    steps = run_steps(tr, ctx, t, stop, run, tracker, say)
    if tracker is not None:
        tracker.close()
    steps_rss = {"start_rss_gb": max_over_ranks(rss_start, ctx), "steps_rss_gb": max_over_ranks(steps.steps_peak, ctx),
                 "peak_rss_gb": max_over_ranks(rss_gb(), ctx)}  # max over ranks: collectives
    finish(cfg, tr, run, ctx, tr.final, tr.step_times, tr.data_times, bench, stop,
           {"memory": steps_rss, "pad_fraction": float(np.mean(tr.pads)) if tr.pads else None})
    return tr.final


def log_epoch(tr: Trainee, run: Path, epoch: int, first: bool, say) -> None:
    """Rank 0 at an epoch's first step: its data stats into epochs.jsonl (said on the run's first only:
    the same data every epoch)."""
    st = {"epoch": epoch, **tr.plan["stats"]["train"]}
    _append(run / "epochs.jsonl", st)
    if first:
        say(f"[vlm] epoch {epoch}: {st['n']} samples, truncated {st['truncated_pct']:.2f}%, zero-label "
            f"{st['zero_label_pct']:.2f}%, avg label tokens {st['avg_label_tokens']:.2f}")


def quick_eval(tr: Trainee, t, run: Path, done: int, rank: int, tracker, say) -> None:
    """The eval between checkpoints: the first quick_eval_size held-out samples."""
    q = tr.eval_on(tr.eval[: t.quick_eval_size], t)
    if rank == 0:
        _append(run / "evals.jsonl", {"step": done, "kind": "quick", **q})
        if tracker is not None:
            tracker.log(done, {"quick_eval_loss": q["loss"]})
        say(f"[vlm] step {done} quick eval loss {q['loss']:.4f} ({q['samples']} samples)")


def full_eval(cfg: VLMConfig, tr: Trainee, run: Path, ctx, done: int, epoch: int, train_loss: float, tracker,
              say) -> dict:
    """At a checkpoint: the whole held-out set and the golden captions; returns the run's `final` row."""
    ev = tr.eval_on(tr.eval, cfg.train)
    final = {"step": done, "train_loss": train_loss, "eval_loss": ev["loss"], "epoch": epoch,
             "eval_buckets": {b: v["loss"] for b, v in ev["buckets"].items()}}
    # golden captions on rank 0; under fsdp every rank generates in lockstep (each forward gathers)
    gold = tr.golden(cfg, ctx.device) if ctx.rank == 0 or tr.sharded else None
    if ctx.rank == 0:
        _append(run / "evals.jsonl", {"step": done, "kind": "full", **ev})
        if tracker is not None:
            tracker.log(done, {"eval_loss": ev["loss"]})
        (run / "golden").mkdir(exist_ok=True)
        write_file(run / "golden" / f"step_{done:06d}.jsonl", "".join(json.dumps(g) + "\n" for g in gold))
        say(f"[vlm] step {done} eval loss {ev['loss']:.4f} over {ev['samples']} samples; golden "
            f"{gold[0]['id'] if gold else '-'}: {gold[0]['generated'] if gold else ''!r}")
    return final


def finish(cfg: VLMConfig, tr: Trainee, run: Path, ctx, final: dict, step_times: list, data_times: list,
           bench: Optional[dict], stop: int, extra: Optional[dict] = None) -> None:
    """The export (a run that ran all its steps) and metrics.json: the last row per step of the logs."""
    warm = slice(3, None) if len(step_times) > 6 else slice(None)
    timing = {"step_time_s": float(np.mean(step_times[warm])) if step_times else None,
              "data_time_s": float(np.mean(data_times[warm])) if data_times else None}
    if bench is not None:
        bench.update(timing, step_times=step_times, data_times=data_times)
    connector = tr.connector_state() if stop == cfg.train.steps else None  # fsdp: a collective
    if ctx.rank != 0:
        return
    if connector is not None:
        save_export(tr.model, cfg, run / "export", extra={"step": stop}, connector=connector)
    doc = {"final": final, "params": tr.counts, "timing": timing, "world_size": ctx.world_size,
           "steps": read_jsonl_last(run / "steps.jsonl"),
           "evals": read_jsonl_last(run / "evals.jsonl", key="step"),
           "epochs": read_jsonl_last(run / "epochs.jsonl", key="epoch"),
           "data": tr.plan["stats"], "split": {"edges": tr.plan["edges"], "bucket_counts": tr.plan["bucket_counts"]},
           **(extra or {})}
    write_file(run / "metrics.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------
# Ray Train driver
# ------------------------------------------------------------------------------------------------

def train_func(config: dict) -> None:
    """The TorchTrainer worker entry point."""
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = build(VLMConfig, config["vlm"], "train_loop_config", prefix="vlm.")
    run = RunDir(config["run_dir"])  # a URI run directory: this worker's staging copy
    run.pull()
    ctx = RayContext(config["storage"], run)  # logs and golden captions reach a URI with each checkpoint
    tracking = build(TrackingConfig, config["tracking"], "train_loop_config", prefix="tracking.") \
        if config.get("tracking") else None
    run_loop(cfg, run.local, ctx, bench=None, tracking=tracking)
    ctx.sync()
    run.discard()


def train_vlm(cfg: LumoConfig | VLMConfig, address: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Run stage-1 alignment with TorchTrainer; returns {"run_dir", "metrics", "checkpoint", "export"}."""
    vcfg = copy.deepcopy(cfg.vlm if isinstance(cfg, LumoConfig) else cfg)
    if vcfg.data.path:  # Ray Train workers run in their own working directory: hand them absolute paths
        vcfg.data.path = str(Path(vcfg.data.path).resolve())
    t = vcfg.train
    rundir = RunDir(t.out)  # a URI run directory is written in a local staging copy, then pushed
    if t.resume:
        t.resume = resolve(t.resume)
    vcfg, _ = prepare_run(vcfg, rundir.local, log, name=str(rundir))
    rundir.push()
    storage = storage_of(t, rundir.loc)
    loop_config = {"vlm": to_dict(vcfg), "run_dir": str(rundir), "storage": storage, "threads": t.cpus_per_worker,
                   "tracking": to_dict(cfg.tracking if isinstance(cfg, LumoConfig) else TrackingConfig())}
    result = launch(train_func, loop_config, t, storage, "train", address, keep=2, section="vlm.train")
    rundir.discard()
    run = rundir.loc
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    out = {"run_dir": str(run), "metrics": metrics,
           "checkpoint": result.checkpoint.path if result.checkpoint else None,
           "export": str(run / "export") if (run / "export").is_dir() else None}
    fin = metrics.get("final", {})
    log(f"[vlm] done: step {fin.get('step')}, eval loss {fin.get('eval_loss')}, run dir {run}")
    return out
