"""`lumo train token-lm`: warm-start a causal LM on the extended vocabulary and train it on tokenized
shards with Ray Train (DDP). The loop (`token_lm_loop`) is a plain function of a worker context, so
tests and Tune trials run it in-process.

Per step: grad_accum micro batches of global_batch / (workers x accum) sequences per rank, AdamW
with one group for the vocabulary matrices (new_row_lr, no weight decay) and one for everything
else (train.lr), warmup + cosine, clipping. Checkpoints hold the trainable weights, optimizer,
scheduler, RNG states, step, data position (epoch, position in this rank's order), the token-space
hash and the config. Crop/template randomness is a function of (seed, epoch, position, rank), so a
resumed run sees exactly the sequences the uninterrupted run would have.

Storage: `token_lm.shards` may be a local path or an object-store URI (or a weighted list of them:
lumo_ray/data/mix.py), and so may
`train.storage_path` (where Ray Train persists the reported checkpoints; a run launched again on it
resumes from the latest; default `<out>/ray`). The run directory `token_lm.out` (config.yaml,
metrics.json, export/, rank 0's copy of checkpoints/) may be a URI too: rank 0 works in a local
staging directory and uploads everything but checkpoints/ when the run ends (storage.RunDir).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from lumo_ray.config import LumoConfig, dump_config, to_dict
from lumo_ray.data.sequences import SequenceBuilder
from lumo_ray.data.task_mix import MODALITY, draw_task, task_probs
from lumo_ray.data.shard_reader import ShardDataset
from lumo_ray.data import mix
from lumo_ray.models.token_lm import (LOSS_TASKS, export, target_losses, task_loss_means, task_loss_sums, vocab_params,
                                     warm_start)
from lumo_ray.runtime import Rate
from lumo_ray.storage import RunDir, is_uri, locate, resolve
from lumo_ray.tracking import open_tracker
from lumo_ray.token_space import TokenSpace

from .checkpoint import load_state, resolve_resume, restore_training, save_training
from .context import RayContext
from .fsdp import full_state, is_sharded, local_rows
from .launch import launch, storage_of, write_json
from .loop import Due, Workload, checkpoint_activations, make_scheduler, micro_batch, rng_state, run_steps, seed_all
from .metrics import max_over_ranks, rss_gb, Throughput


def run_token_space(cfg: LumoConfig) -> TokenSpace:
    """The run's token space, from the config (adapters built, as the tokenizer built them)."""
    from lumo_ray.uti import load_token_space

    return load_token_space(cfg.uti)


def text_tokenizer(cfg: LumoConfig):
    from lumo_ray.codecs.text import build_text_adapter

    return build_text_adapter(cfg.uti.text)




class TrainSequences:
    """This rank's training sequences with a recorded data position, so a resumed run sees exactly
    the sequences the uninterrupted one would have. Samples come from the shard mix (lumo_ray.data.mix:
    one source, or several drawn by weight); crop / template randomness is a function of (seed, epoch,
    position, rank, and the source in a mix). Under layouts='any' (stage 4) each sequence's task is drawn
    from the task mix at its step and takes the next sample of that task's modality stream, itself a mix
    of the sources holding that modality."""

    def __init__(self, c, seed: int, builder: SequenceBuilder, ts: TokenSpace, rank: int, world: int,
                 data: Optional[dict] = None):
        from dataclasses import asdict

        self.c, self.seed, self.builder, self.rank = c, seed, builder, rank
        self.mixed = c.seq.layouts == "any"
        self.sources = mix.sources(c.shards)
        data = data or {}

        def stream(idx: list[int], state, modality=None, salt=0) -> tuple[list[int], mix.MixStream]:
            ds = [ShardDataset(self.sources[k][0], "train", seed=seed, rank=rank, world_size=world, expected=ts)
                  for k in idx]
            return idx, mix.MixStream(ds, [self.sources[k][1] for k in idx], seed, rank, state, modality, salt)

        if self.mixed:
            self.weights = asdict(c.mmpt.task_weights)
            held = [mix.modalities(p) for p, _ in self.sources]
            self.streams = {}
            for salt, m in enumerate(("image", "audio"), 1):  # the sources holding m (all when none is known to)
                idx = [k for k, h in enumerate(held) if h is None or m in h] or list(range(len(self.sources)))
                self.streams[m] = stream(idx, data.get("streams", {}).get(m), m, salt)
        else:
            self.stream = stream(list(range(len(self.sources))), data)

    def next(self, step: int, j: int):
        """The j-th sequence of this rank at optimizer step `step` (0-based)."""
        if not self.mixed:
            k, epoch, i, s = self.stream[1].next()
            return self.builder.build(s, rng=np.random.default_rng(self.crop_key(self.stream, k, epoch, i)))
        m = self.c.mmpt
        task = draw_task(task_probs(self.weights, step, m.ramp_steps, m.blend_steps),
                         np.random.default_rng([self.seed, step, j, self.rank, 4]))
        mod = MODALITY[task]
        k, epoch, i, s = self.streams[mod][1].next()
        key = self.crop_key(self.streams[mod], k, epoch, i, 1 + (mod == "audio"))
        return self.builder.build(s, task=task, rng=np.random.default_rng(key))

    def crop_key(self, stream, k: int, epoch: int, i: int, tag: int = 0) -> list[int]:
        if len(self.sources) > 1:  # a mix: the source too
            return [self.seed, epoch, i, self.rank, tag, stream[0][k]]
        return [self.seed, epoch, i, self.rank] + ([tag] if tag else [])  # one source: the keys before mixing

    def state(self) -> dict:
        if self.mixed:
            return {"streams": {m: st.state() for m, (_, st) in self.streams.items()}}
        return self.stream[1].state()

    def seen(self) -> list[int]:
        """Samples taken from each source so far (this rank; a resumed run counts from the start)."""
        out = [0] * len(self.sources)
        for idx, st in (self.streams.values() if self.mixed else [self.stream]):
            for k, n in zip(idx, st.seen):
                out[k] += n
        return out


def load_checkpoint(ck: Path, ts: TokenSpace) -> dict:
    """The checkpoint state, after refusing another token space (both hashes + first differing field)."""
    ck_ts = ck / "token_space.json"
    if ck_ts.exists():
        ts.ensure_same(TokenSpace.load(ck_ts), what=f"checkpoint {ck} token space")
    st = load_state(ck)
    if st.get("token_space_hash") != ts.hash:
        raise ValueError(f"checkpoint {ck} has token space {st.get('token_space_hash')}, run has {ts.hash}")
    return st


def evaluate_tasks(model: torch.nn.Module, builder: SequenceBuilder, samples: list[dict], ctx, batch_size: int = 16,
                   autocast: bool = False) -> dict:
    """Token-weighted target loss per task over `samples` (this rank's share), summed over ranks."""
    was = model.training
    model.eval()
    batches = 0
    if is_sharded(next(model.parameters())):  # every rank must run as many forwards
        batches = int(max_over_ranks(-(-sum(len(builder.tasks_of(x)) for x in samples) // batch_size), ctx))
    tot = ctx.all_reduce(task_loss_sums(model, builder, samples, batch_size, autocast, batches).to(ctx.device)).cpu()
    model.train(was)
    return task_loss_means(tot)


def param_groups(raw: torch.nn.Module, c, t) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """AdamW groups: the vocabulary matrices at new_row_lr without weight decay, the rest at train.lr."""
    vocab = vocab_params(raw)
    vocab_ids = {id(p) for p in vocab}
    rest = [p for p in raw.parameters() if p.requires_grad and id(p) not in vocab_ids]
    groups = [{"params": vocab, "lr": c.new_row_lr, "weight_decay": 0.0}]
    if rest:
        groups.append({"params": rest, "lr": t.lr, "weight_decay": t.weight_decay})
    return groups, vocab


def restore(ck: Path, ts: TokenSpace, raw: torch.nn.Module, opt, sched, sharded: bool = False) -> tuple[int, dict]:
    """Trainable weights, optimizer, scheduler and RNG from a checkpoint; returns (step, data position)."""
    st = load_checkpoint(ck, ts)

    def trainable(s: dict) -> None:  # the frozen weights come from the warm start
        with torch.no_grad():
            for n, p in raw.named_parameters():
                if n in s["trainable"]:
                    p.copy_(s["trainable"][n])

    restore_training(ck, st, "token_lm.train", sharded, raw, opt, sched, trainable, trainable_names(raw))
    return st["step"], st["data"]


def trainable_names(raw: torch.nn.Module) -> set[str]:
    """The parameters a checkpoint holds: the trainable ones (the frozen come from the warm start)."""
    return {n for n, p in raw.named_parameters() if p.requires_grad}


class Stepper:
    """One optimizer step of the token LM: grad_accum micro-batches from the source, token-weighted
    loss, per-task loss sums (train_<task> at the next eval), clipping; under freeze=full the TEXT rows
    of the vocabulary matrices move at train.lr while the new rows move at new_row_lr."""

    def __init__(self, model, groups, vocab, source, builder, c, t, ts, per: int, autocast: bool):
        self.model, self.groups, self.vocab, self.source, self.builder = model, groups, vocab, source, builder
        self.c, self.t, self.ts, self.per, self.autocast = c, t, ts, per, autocast
        self.task_sums: dict[str, list[float]] = {}
        self.tokens = self.targets = self.seqs = 0
        self.positions = 0  # input positions computed, padding included (tokens: the real ones)

    def __call__(self, step: int, opt, sched) -> float:
        t, total = self.t, 0.0
        opt.zero_grad(set_to_none=True)
        for a in range(t.grad_accum):
            batch = self.builder.batch([self.source.next(step, a * self.per + j) for j in range(self.per)])
            loss_sum, n = target_losses(self.model, batch, self.autocast)
            for task, ls, k in zip(batch["tasks"], loss_sum.tolist(), n.tolist()):
                acc = self.task_sums.setdefault(task, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + ls, acc[1] + k
            loss = loss_sum.sum() / n.sum().clamp(min=1)
            (loss / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
            self.tokens += int((batch["sample_index"] >= 0).sum())
            self.positions += batch["input_ids"].numel()
            self.targets += int(n.sum())
            self.seqs += len(batch["tasks"])
        text = self.ts.text_vocab
        if self.c.freeze != "full":  # sharded parameters are not the ones apply_freeze hooked: mask here too
            for p in self.vocab:
                if p.grad is not None and is_sharded(p.grad):
                    local_rows(p.grad, text).zero_()
        if t.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], t.clip)
        keep = [local_rows(p, text).detach().clone() for p in self.vocab] if self.c.freeze == "full" else None
        opt.step()
        if keep is not None:
            with torch.no_grad():
                for p, old in zip(self.vocab, keep):
                    rows = local_rows(p, text)
                    rows.copy_(old + (rows - old) * (t.lr / self.c.new_row_lr))
        sched.step()
        return total

    def train_losses(self, ctx) -> dict:
        """Token-weighted train loss per task since the last call, summed over ranks."""
        out, self.task_sums = train_task_losses(self.task_sums, ctx), {}
        return out


@dataclass
class Trainee:
    """A token-LM worker's training state: the warm-started model (`raw`; `model` is it prepared for the
    strategy), its optimizer and schedule, the step and data stream resumed, the step function."""
    ws: Any
    raw: torch.nn.Module
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    step: int
    source: TrainSequences
    train_step: Stepper
    sharded: bool
    meta: bool
    rss_build: float


def warm_model(cfg: LumoConfig, ts: TokenSpace, log, meta: bool = False):
    """The warm start (lumo_ray.models.token_lm.warm_start) of this run's base on the token space."""
    c, t = cfg.token_lm, cfg.token_lm.train
    return warm_start(c.base, ts, c.freeze, c.init_scale, t.seed, c.lora, log=log,
                      init=c.mmpt.init if c.seq.layouts == "any" else "", meta=meta)


def build_trainee(cfg: LumoConfig, ctx, ts: TokenSpace, builder: SequenceBuilder, run_dir: Path, say) -> Trainee:
    """The model warm-started (fsdp with meta_init: on the meta device, each rank filling its shards) and
    prepared, AdamW over its parameter groups, and the checkpoint train.resume / Ray's restart names."""
    c, t = cfg.token_lm, cfg.token_lm.train
    sharded = t.strategy == "fsdp"
    meta = sharded and t.meta_init
    ws = warm_model(cfg, ts, say, meta)
    raw = ws.model
    checkpoint_activations(raw, t.activation_checkpointing)
    model = ctx.prepare(raw, t.strategy, t.bf16)  # fsdp shards raw in place: its parameters change
    if ws.fill is not None:
        ws.fill(raw, ctx.device)
    rss_build = rss_gb()  # the peak through the model's build and sharding
    groups, vocab = param_groups(raw, c, t)
    opt = torch.optim.AdamW(groups)
    sched = make_scheduler(opt, t)
    step, data = 0, {}
    ck = resolve_resume(t.resume, run_dir, ctx, say)
    if ck is not None:
        step, data = restore(ck, ts, raw, opt, sched, sharded)
        say(f"resumed from {ck} at step {step} (data position {data})")
    source = TrainSequences(c, t.seed, builder, ts, ctx.rank, ctx.world_size, data)
    autocast = t.bf16 and ctx.device.type == "cuda"
    train_step = Stepper(model, groups, vocab, source, builder, c, t, ts, micro_batch(t, ctx.world_size), autocast)
    return Trainee(ws, raw, model, opt, sched, step, source, train_step, sharded, meta, rss_build)


def save_token_lm(cfg: LumoConfig, ctx, ts: TokenSpace, tr: Trainee, run_dir: Path, step: int) -> Optional[Path]:
    """A checkpoint: the trainable weights (the frozen come from the warm start), optimizer, schedule,
    RNG, data position, token space."""
    t, raw = cfg.token_lm.train, tr.raw
    state = {"strategy": t.strategy, "scheduler": tr.sched.state_dict(), "rng": rng_state(), "step": step,
             "data": tr.source.state(), "token_space_hash": ts.hash, "config": to_dict(cfg)}
    extra = {"token_space.json": json.dumps(ts.to_json(), indent=2)}
    return save_training(ctx, run_dir, step, tr.sharded, raw, tr.opt, state, lambda: {"trainable": {
        n: p.detach().cpu().clone() for n, p in raw.named_parameters() if p.requires_grad}},
        trainable_names(raw), extra)


def golden_writer(cfg: LumoConfig, ctx, ts: TokenSpace, tr: Trainee, builder: SequenceBuilder, run_dir: Path,
                  say) -> Optional[GoldenWriter]:
    """Stage 4's golden generations: rank 0 writes them; under fsdp every rank generates with it in lockstep
    (each forward gathers the sharded layers), the others into a scratch directory. None: not stage 4."""
    c = cfg.token_lm
    if not ((ctx.rank == 0 or tr.sharded) and c.seq.layouts == "any" and c.mmpt.golden_n > 0):
        return None
    return GoldenWriter(cfg, ts, tr.raw, builder, run_dir if ctx.rank == 0 else None, say)


def step_line(step: int, steps: int, total: float, rep: dict, rate: Rate) -> str:
    """A progress line: loss, the eval per task when there was one, rate, throughput, padding, MFU."""
    evals = (f" eval {rep['eval_loss']:.4f} (" + ", ".join(f"{k[5:]} {v:.3f}" for k, v in rep.items()
                                                       if k.startswith("eval_") and k != "eval_loss") + ")"
             if "eval_loss" in rep else "")
    if "tokens_per_s" not in rep:  # the first step's line, before a throughput window closes
        return f"token-lm step {step}/{steps} loss {total:.4f}{evals} ({rate(step)})"
    return (f"token-lm step {step}/{steps} loss {total:.4f}{evals} ({rate(step)}, "
            f"{rep['tokens_per_s']:,.0f} tokens/s, {rep['pad_fraction']:.0%} padding"
            + (f", MFU {rep['mfu']:.1%}" if "mfu" in rep else "") + ")")


def evaluate_step(model, builder: SequenceBuilder, eval_samples: list, ctx, autocast: bool) -> dict:
    """{'eval_loss': all tasks, 'eval_<task>': per task} over this rank's eval samples, summed over ranks."""
    ev = evaluate_tasks(model, builder, eval_samples, ctx, autocast=autocast)
    return {"eval_loss": ev["all"], **{f"eval_{k}": v for k, v in ev.items() if k != "all"}}


class TokenLM(Workload):
    """The token LM (stage 3.3) and stage 4 as the one loop's workload: the eval split, the sequence
    builder, the warm-started Trainee, stage 4's golden writer, the warm start's eval (eval_start: the
    training verdict's baseline; Tune trials, scored by their hook, skip it), throughput. hook(step,
    model) -> dict|None runs after each step's checkpoint (Tune's scoring)."""

    def __init__(self, cfg: LumoConfig, ctx, ts: TokenSpace, run_dir: Path, say, hook: Optional[Callable],
                 eval_start: bool):
        c = cfg.token_lm
        self.cfg, self.ctx, self.ts, self.run_dir, self.hook, self.t = cfg, ctx, ts, run_dir, hook, c.train
        self.eval_samples = mix.read_split(c.shards, "eval", rank=ctx.rank, world_size=ctx.world_size, expected=ts)
        self.tok = text_tokenizer(cfg)
        self.builder = SequenceBuilder(ts, c.seq, self.tok.encode)
        self.tr = tr = build_trainee(cfg, ctx, ts, self.builder, run_dir, say)
        self.start, self.autocast = tr.step, tr.train_step.autocast
        self.golden = golden_writer(cfg, ctx, ts, tr, self.builder, run_dir, say)
        self.start_eval = self.eval_now() if tr.step == 0 and eval_start else {}
        if self.start_eval:  # the warm start's eval loss: what training has to improve on (the demo's verdict)
            say(f"token-lm warm start: eval {self.start_eval['eval_loss']:.4f}")
        self.speed = Throughput(tr.raw, ctx.device)
        self.evals: list = []  # every eval's per-task train and eval losses (metrics.json)
        self.metrics: dict = {}  # the last eval's report row
        tr.model.train()

    def eval_now(self) -> dict:
        return evaluate_step(self.tr.model, self.builder, self.eval_samples, self.ctx, self.autocast)

    def train_step(self, step: int) -> dict:
        return {"step": step + 1, "loss": self.tr.train_step(step, self.tr.opt, self.tr.sched)}

    def evaluate(self, done: int, due: Due) -> dict:
        st, rep = self.tr.train_step, {}
        if due.eval:
            rep.update({**self.eval_now(), **st.train_losses(self.ctx)})
        if due.log:
            rep.update(self.speed.report(st.tokens, st.targets, st.seqs, st.positions))
        return rep

    def save(self, done: int) -> Optional[Path]:
        return save_token_lm(self.cfg, self.ctx, self.ts, self.tr, self.run_dir, done)

    def after_step(self, done: int, due: Due, rep: dict, ck: Optional[Path]) -> dict:
        if due.ckpt and self.golden is not None:
            self.golden.write(done)
        # after the checkpoint: an interrupted trial can resume. fsdp: every rank runs the hook (its
        # forwards gather the sharded layers), rank 0's result is the one reported
        h = (self.hook(done, self.tr.raw) or {}) if self.hook is not None and (self.ctx.rank == 0 or self.tr.sharded) \
            else {}
        row = {**rep, **h}
        if "eval_loss" in row:
            self.metrics = row
            self.evals.append({k: v for k, v in row.items() if k.startswith(("eval_", "train_")) or k == "step"})
        return h

    def line(self, done: int, rep: dict, rate) -> str:
        return step_line(done, self.t.steps, rep["loss"], rep, rate)


def token_lm_loop(cfg: LumoConfig, ctx, log=print, hook: Optional[Callable] = None,
                  ts: Optional[TokenSpace] = None, eval_start: bool = True) -> dict:
    """Train on one worker: the one loop over TokenLM. hook(step, model) -> dict|None runs on rank 0
    after each step (Tune). eval_start: evaluate the warm start before step 1 (the training verdict's
    baseline; Tune trials, scored by their hook, skip it)."""
    c, t = cfg.token_lm, cfg.token_lm.train
    rss_start = rss_gb()  # the process before the model: libraries, Ray, the data reader
    run = RunDir(c.out)  # a URI run directory is staged locally and pushed at the end
    run_dir = run.local
    torch.set_num_threads(t.threads)
    seed_all(t.seed)
    say = log if ctx.rank == 0 else (lambda *a, **k: None)
    ts = ts or run_token_space(cfg)
    if ctx.rank == 0:
        dump_config(cfg, run_dir)
    mix.check_sources(c.shards, ts)  # before any training: one token space across the mix, the run's
    w = TokenLM(cfg, ctx, ts, run_dir, say, hook, eval_start)
    tracker = open_tracker(run_dir, cfg.tracking, "mmpt" if c.seq.layouts == "any" else "token_lm", to_dict(c),
                           ctx.rank)
    if tracker is not None and w.start_eval:
        tracker.log(0, w.start_eval)
    steps = run_steps(w, ctx, t, t.steps, run_dir, tracker, say)
    done = {"secs": steps.secs, "steps_peak": steps.steps_peak, "rss_start": rss_start, "step": steps.step,
            "history": steps.history, "evals": w.evals, "start": w.start_eval, "golden": w.golden,
            "last_eval": w.metrics, "tokenizer": w.tok.tokenizer}
    return finish_token_lm(cfg, ctx, ts, w.tr, run, done, tracker)


def finish_token_lm(cfg: LumoConfig, ctx, ts: TokenSpace, tr: Trainee, run: RunDir, done: dict, tracker) -> dict:
    """The export (a plain model: fsdp gathers the weights; a meta-built run each weight in turn), the
    memory peaks and the data mix over every rank, then rank 0's metrics.json; returns it (rank 0)."""
    c, raw, run_dir = cfg.token_lm, tr.raw, run.local
    seen = ctx.all_reduce(torch.tensor(tr.source.seen(), dtype=torch.float64).to(ctx.device)).cpu()
    data_mix = mix.mix_report(c.shards, [int(n) for n in seen.tolist()])  # the mix trained on, all ranks
    out, about = run_dir / "export", {"base": c.base, "freeze": c.freeze, "seed": c.train.seed,
                                      "init_scale": c.init_scale}
    tok = done["tokenizer"]
    if tr.meta:  # each weight gathered in turn (every rank), rank 0 writes it
        export(raw, ts, out, about, tok, sharded=True, write=ctx.rank == 0)
    else:
        plain = raw
        if tr.sharded:  # the export is a plain model: the gathered weights in a fresh copy of the warm start
            full = full_state(raw)
            if ctx.rank == 0:
                plain = warm_model(cfg, ts, lambda *a, **k: None).model
                plain.load_state_dict(full)
        if ctx.rank == 0:
            export(plain, ts, out, about, tok)
    # start: before the model; build: through its build and sharding; steps: in training steps; peak: the
    # whole run, export included
    memory = {"start_rss_gb": max_over_ranks(done["rss_start"], ctx), "build_rss_gb": max_over_ranks(tr.rss_build, ctx),
              "steps_rss_gb": max_over_ranks(done["steps_peak"], ctx), "peak_rss_gb": max_over_ranks(rss_gb(), ctx)}
    if ctx.device.type == "cuda":
        memory["peak_gpu_gb"] = max_over_ranks(torch.cuda.max_memory_allocated(ctx.device) / 1e9, ctx)
    if ctx.rank != 0:
        run.discard()
        return done["last_eval"]
    tracker.close()
    st = tr.train_step
    metrics = {**final_metrics(done["last_eval"], done["history"], done["evals"], done["start"], done["golden"],
                               tr.ws.counts, ts, done["step"], done["secs"], st.tokens * ctx.world_size, out, run),
               "memory": memory, "pad_fraction": 1.0 - st.tokens / max(st.positions, 1), "data_mix": data_mix}
    write_json(run_dir / "metrics.json", metrics)
    run.push()
    run.discard()
    return metrics


def final_metrics(last_eval: dict, history: list, evals: list, start: dict, golden, counts: dict, ts: TokenSpace,
                  steps: int, secs: float, tokens: int, out: Path, run: RunDir) -> dict:
    """metrics.json of a token-LM run: the last eval (overall, per task, train per task), the loss
    history, every eval, the warm start's eval, golden dirs, trainable counts, throughput (tokens_per_s
    counts real tokens, padding excluded), the export."""
    m = last_eval
    return {**m, "train_loss": history[-1] if history else None, "loss_history": history,
            "eval": {k[5:]: v for k, v in m.items() if k.startswith("eval_") and k != "eval_loss"},
            "train_tasks": {k[6:]: v for k, v in m.items() if k.startswith("train_") and k != "train_loss"},
            "evals": evals, "eval_at_start": start, "golden": golden.dirs if golden is not None else [],
            "trainable": counts, "token_space_hash": ts.hash, "steps": steps, "seconds": secs,
            "tokens_per_s": tokens / max(secs, 1e-9), "export": str(run.loc / "export") if run.remote else str(out)}


def train_task_losses(sums: dict[str, list[float]], ctx) -> dict:
    """Token-weighted train loss per task over the steps since the last eval, summed over ranks."""
    tot = torch.tensor([sums.get(k, [0.0, 0.0]) for k in LOSS_TASKS], dtype=torch.float64)
    tot = ctx.all_reduce(tot.to(ctx.device)).cpu()
    return {f"train_{k}": float(tot[i, 0] / tot[i, 1]) for i, k in enumerate(LOSS_TASKS) if tot[i, 1] > 0}


class GoldenWriter:
    """Rank 0's golden generations at every checkpoint: <run>/golden/step_N/ (lumo_ray.eval.golden).
    Sampling runs under its own forked RNG, so training randomness (and resume) is untouched.
    run_dir None: a sharded rank's partner writer, generating the same batches into a scratch folder."""

    def __init__(self, cfg: LumoConfig, ts: TokenSpace, model, builder: SequenceBuilder, run_dir: Optional[Path], log):
        self.cfg, self.ts, self.model, self.builder, self.log = cfg, ts, model, builder, log
        self.scratch = run_dir is None
        self.run_dir = Path(tempfile.mkdtemp(prefix="lumo-golden-")) if self.scratch else run_dir
        self.run = None
        self.dirs: list[str] = []

    def write(self, step: int) -> None:
        from lumo_ray.eval.golden import write_golden
        from lumo_ray.generate import Run
        from lumo_ray.uti import build_adapters

        if self.run is None:  # the codecs decode the generated media
            self.run = Run(self.run_dir, self.cfg, self.model, self.ts, build_adapters(self.cfg.uti), self.builder,
                           True, self.ts.hash, str(self.run_dir))
        m = self.cfg.token_lm.mmpt
        d = f"golden/step_{step}"
        from torch.distributed.fsdp import FSDPModule

        # A LoRA model's generate runs its inner model, past the FSDP root's forward hooks: gather the root
        # unit (embeddings, head, norm) for the whole generation; each decoder layer still gathers its own.
        root = self.model if isinstance(self.model, FSDPModule) else None
        if root is not None:
            root.unshard()
        try:
            write_golden(self.run, self.run_dir / d, m.golden_n, m.golden_seed, log=None if self.scratch else self.log)
        finally:
            if root is not None:
                root.reshard()
        if self.scratch:
            shutil.rmtree(self.run_dir / "golden", ignore_errors=True)
        else:
            self.dirs.append(d)


def _worker(config: dict, ctx=None) -> None:
    """A Ray Train worker: the driver's token space comes with the config (built and checked once there),
    so a worker builds no image or audio codec to learn it."""
    token_lm_loop(config["cfg"], ctx or RayContext(), ts=TokenSpace.from_json(config["ts_json"]))


def prepare_run(cfg: LumoConfig) -> str:
    """Absolute paths or URIs (workers may run elsewhere) and the config copy in the run directory;
    returns the run directory (path or URI)."""
    c = cfg.token_lm
    c.out = run_dir = resolve(c.out)
    if isinstance(c.shards, str):
        c.shards = resolve(c.shards) if c.shards else c.shards
    else:
        for s in c.shards:
            s.path = resolve(s.path) if s.path else s.path
    for k in ("storage_path", "resume"):
        v = getattr(c.train, k)
        if v and v != "auto":
            setattr(c.train, k, resolve(v))
    if c.base != "tiny" and (is_uri(c.base) or Path(c.base).exists()):
        c.base = resolve(c.base)
    if c.mmpt.init:
        c.mmpt.init = resolve(c.mmpt.init)
    dump_config(cfg, run_dir)
    return run_dir


def run_token_lm(cfg: LumoConfig, address: Optional[str] = None, log=print) -> dict:
    """`lumo train token-lm`: Ray Train DDP job; returns metrics.json."""
    run_dir = prepare_run(cfg)
    # Refuse mismatched shards (between the sources of a mix, then against the run) before any worker starts.
    ts = run_token_space(cfg)
    mix.check_sources(cfg.token_lm.shards, ts)
    launch(_worker, {"cfg": cfg, "ts_json": ts.to_json()}, cfg.token_lm.train, storage_of(cfg.token_lm.train, run_dir), "token_lm", address,
           section="token_lm.train")
    m = json.loads((locate(run_dir) / "metrics.json").read_text())
    log(f"token LM: eval loss {m.get('eval_loss', float('nan')):.4f} per task "
        + ", ".join(f"{k} {v:.3f}" for k, v in m["eval"].items()) + f"; export {m['export']}")
    return m
