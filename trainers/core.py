"""The training machinery every trainer shares (VLM alignment, base LM, token LM, stage 4, the VQ codec):
the worker context (one process, or a Ray Train worker), the LR schedule, RNG state, the checkpoint
layout, the micro-batch split, when a step logs / evaluates / checkpoints (and how an LM step ends),
fault injection for the restart tests, and the TorchTrainer launcher. A trainer keeps only its model,
its batches and its loss.

The loops are plain functions of a context, so the same code runs in-process (tests, Tune trials,
benchmarks, notebooks) and inside Ray Train workers; only `RayContext` and `launch` touch Ray.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from lumo_ray.config.lm import TrainConfig

CKPT_STATE = "state.pt"
# the non-tensor state (step, data position, RNG, scheduler, config): JSON, so resuming unpickles nothing
CKPT_JSON = "state.json"
RESUME_TODO = "resume another checkpoint (train.resume=auto takes the newest that verifies)"
# run_dir/checkpoints/step-NNNNNNN/{state.pt, state.json, meta.json, ..., SHA256SUMS}: the one checkpoint
# layout; SHA256SUMS (lumo_ray/integrity.py) is written last and verified before a resume reads anything.
# Checkpoints reach an object store through Ray Train's storage_path, so a run directory's mirror skips the folder.
CHECKPOINTS = "checkpoints"
# train.strategy fsdp: <checkpoint>/shards/ holds torch.distributed.checkpoint files, each rank's shard of
# the weights and the optimizer state (__<rank>_0.distcp) and rank 0's .metadata; state.json the rest.
SHARDS = "shards"
HOLD_S = 300  # train.hold_at_step: long enough for a test to kill a node, short enough to end a forgotten run


# ------------------------------------------------------------------------------------------------
# Worker context
# ------------------------------------------------------------------------------------------------

class LocalContext:
    """One process, no Ray: tests, Tune trials, benchmarks and notebooks. on_report(metrics, ckpt_dir)
    sees every report (a Tune trial forwards them; a test keeps checkpoints)."""
    rank, world_size = 0, 1
    report_every_step = True

    def __init__(self, device: str | torch.device = "cpu", checkpoint: Optional[Path] = None,
                 on_report: Callable | None = None):
        self.device = torch.device(device)
        self._ckpt = checkpoint
        self.on_report = on_report

    def prepare(self, model: torch.nn.Module, strategy: str = "ddp", bf16: bool = False,
                forward_methods: tuple[str, ...] = ()) -> torch.nn.Module:
        if strategy == "fsdp":
            single_process_group()
            return shard(model, self.device, bf16, forward_methods)
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def report(self, metrics: dict, ckpt_dir: Optional[Path] = None) -> None:
        if self.on_report:
            self.on_report(metrics, ckpt_dir)

    def restored_checkpoint(self) -> Optional[Path]:
        return self._ckpt

    def sync(self) -> None:
        """Make the run directory durable where it lives (nothing to do in one local process)."""


class RayContext(LocalContext):
    """Inside a Ray Train worker: DDP via prepare_model, reports on every rank. storage: the run's Ray
    storage_path, where a restarted worker finds the last persisted checkpoint when Ray hands it none;
    run: a URI run directory's staging copy (storage.RunDir), which rank 0 pushes before each checkpoint."""

    # A Ray Train report costs a round trip through the controller: report on log/eval/checkpoint
    # steps only (the same steps on every rank), not on every step.
    report_every_step = False

    def __init__(self, storage: str | None = None, run: Any = None):
        import ray.train
        import ray.train.torch

        from pipelines.ray_env import placement, quiet_actor_exit, quiet_train_worker, unit_device

        quiet_train_worker()
        quiet_actor_exit()
        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        # the device follows the GPU Ray gave the worker, and falls back to CPU where CUDA is absent
        # (ray.train.torch.get_device() would name cuda for a GPU this torch cannot use)
        self.device, ids = unit_device()
        self.placement = placement(self.device, ids)  # in every report: launch() names it at the end
        self.storage, self.run = storage, run

    def prepare(self, model: torch.nn.Module, strategy: str = "ddp", bf16: bool = False,
                forward_methods: tuple[str, ...] = ()) -> torch.nn.Module:
        import ray.train.torch

        if strategy == "fsdp":
            return shard(model, self.device, bf16, forward_methods)
        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def report(self, metrics: dict, ckpt_dir: Optional[Path] = None) -> None:
        from ray.train import Checkpoint

        view = None  # a sharded checkpoint: every rank reports its own files, Ray Train merges them
        if ckpt_dir is not None and (self.rank == 0 or (ckpt_dir / SHARDS).is_dir()):
            view = rank_files(Path(ckpt_dir), self.rank)
            # logs first: a restart resumes from this checkpoint and continues the logs it pulls
            self.sync()
        self._train.report({**metrics, "placement": self.placement},
                           checkpoint=Checkpoint.from_directory(str(view)) if view is not None else None)
        if view is not None and view != Path(ckpt_dir):
            shutil.rmtree(view, ignore_errors=True)

    def restored_checkpoint(self) -> Optional[Path]:
        ck = self._train.get_checkpoint()
        if ck is not None:
            return Path(ck.to_directory())
        # A worker killed outright (SIGKILL, lost node) can take reports the controller had not
        # registered yet with it; the checkpoints already persisted in the run's storage remain.
        last = latest_ray_checkpoint(self.storage) if self.storage else None
        return fetch_checkpoint(last) if last else None

    def sync(self) -> None:
        if self.run is not None and self.rank == 0:
            self.run.push()


def latest_ray_checkpoint(storage: str | Path, name: str = "train") -> Optional[str]:
    """The newest checkpoint (path or URI) Ray Train persisted under `storage`/`name`."""
    from lumo_ray.storage import latest_ray_checkpoint as latest

    last = latest(storage, name, CKPT_STATE)
    return str(last) if last else None


def fetch_checkpoint(p: str | Path) -> Path:
    """A local directory holding checkpoint `p`: itself, or a download of a URI into a temp directory."""
    from lumo_ray.storage import download_dir, is_uri

    return download_dir(p, tempfile.mkdtemp(prefix="lumo-ckpt-")) if is_uri(str(p)) else Path(p)


# ------------------------------------------------------------------------------------------------
# Schedule, RNG, cadence, faults
# ------------------------------------------------------------------------------------------------

def lr_lambda(warmup: int, steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup over `warmup` steps, then cosine down to min_ratio x the peak at `steps`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        prog = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def make_scheduler(opt: torch.optim.Optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    """t: a train section (warmup_steps, steps, min_lr_ratio)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))


def rng_state() -> dict:
    """Every generator's state as JSON (torch's byte states as hex): a checkpoint's state.json."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state().numpy().tobytes().hex(),
            "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(words), gauss_next],
            "cuda": ([t.numpy().tobytes().hex() for t in torch.cuda.get_rng_state_all()]
                     if torch.cuda.is_available() else None)}


def set_rng_state(s: dict) -> None:
    def byte_state(h: str) -> torch.Tensor:
        return torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8)

    torch.set_rng_state(byte_state(s["torch"]))
    kind, key, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    version, words, gauss_next = s["python"]
    random.setstate((version, tuple(words), gauss_next))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([byte_state(h) for h in s["cuda"]])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def checkpoint_activations(model: torch.nn.Module, on: bool) -> None:
    """train.activation_checkpointing: each decoder layer recomputes its activations in the backward
    pass (non-reentrant, so frozen inputs and LoRA keep their gradients); no KV cache while training."""
    if not on:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper: its model
    base.config.use_cache = False
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def due(step: int, every: int, last: bool = False) -> bool:
    """Whether `step` (1-based, just finished) is one of every `every` steps (0: never), or the last."""
    return last or (every > 0 and step % every == 0)


def micro_batch(t: TrainConfig, world_size: int) -> int:
    """Each worker's batch: global_batch split exactly over the workers and grad_accum."""
    per = t.global_batch // (world_size * t.grad_accum)
    if per < 1 or per * world_size * t.grad_accum != t.global_batch:
        raise ValueError(f"global_batch {t.global_batch} is not divisible by num_workers {world_size} x "
                         f"grad_accum {t.grad_accum}")
    return per


def end_of_step(ctx, t: TrainConfig, step: int, rep: dict, ck_dir: Optional[Path], tracker, log, line: Callable[[], str]) -> None:
    """What every LM step ends with: rank 0's progress line every log_every steps, a report on the
    log / eval / checkpoint steps (every step in one process), the tracker's scalars."""
    last = step == t.steps
    if ctx.rank == 0 and due(step, t.log_every, last):
        log(line())
    if ctx.report_every_step or last or any(due(step, k) for k in (t.log_every, t.eval_every, t.ckpt_every)):
        ctx.report(rep, ck_dir)
    if tracker is not None:
        tracker.log(step, rep)


def inject_fault(t, step: int, rank: int, run_dir: Path, ctx: LocalContext) -> None:
    """The restart tests' faults, once per run (a marker file in the run directory): train.fail_at_step
    kills rank 0's process (SIGKILL: a real crash, not an exception); train.hold_at_step stalls it
    HOLD_S seconds while the other ranks wait in their next collective (a node can be killed then)."""
    for at, marker, act in ((getattr(t, "fail_at_step", None), ".failed_once", "killed"),
                            (getattr(t, "hold_at_step", None), ".held_once", "held")):
        if at is None or step != at or rank != 0 or (run_dir / marker).exists():
            continue
        (run_dir / marker).write_text(f"{act} at step {step}\n")
        ctx.sync()  # a restarted worker may stage a fresh copy of a URI run directory
        if act == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(HOLD_S)


def single_process_group() -> None:
    """FSDP needs a process group; one process (tests, a notebook) gets a gloo group of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def shard(model: torch.nn.Module, device: torch.device, bf16: bool, forward_methods: tuple[str, ...] = ()) -> torch.nn.Module:
    """FSDP2: each decoder (or vision encoder) layer its own unit (gathered for its forward and backward
    only), the rest (embeddings, head, final norm; the VLM's connector) the root unit. bf16 parameters
    with fp32 gradient reduction on CUDA when bf16 is on; fp32 otherwise. forward_methods: the model's
    methods other than forward that callers enter it by (the root unit gathers on those too)."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # said on every step when a forward returns a view (the VLM's visual tokens): a caution about
    # in-place edits of the output, which no caller here makes
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
    if not any(p.is_meta for p in model.parameters()):  # a meta-built model: fully_shard moves its real tensors
        model.to(device)
    for m in list(model.modules()):
        if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer")):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(t: torch.Tensor, stop: int) -> torch.Tensor:
    """The rows < stop of a (possibly FSDP-sharded, dim-0) tensor that this rank holds: a view to edit
    in place. FSDP2 shards dim 0 in torch.chunk pieces: rank r holds rows [r * c, (r + 1) * c)."""
    if not is_sharded(t):
        return t[:stop]
    import torch.distributed as dist

    local = t.to_local()
    c = -(-t.shape[0] // dist.get_world_size())
    start = dist.get_rank() * c
    return local[: max(0, min(local.shape[0], stop - start))]


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to full CPU tensors (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_state(model: torch.nn.Module, opt: torch.optim.Optimizer, names: Optional[set[str]] = None) -> dict:
    """This rank's shards of the weights (those in `names`, else all) and of the optimizer state, keyed by
    parameter name. A fresh optimizer gets its state initialised (at lr 0) so that a load has a target."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, opt)
    return {"model": {k: v for k, v in weights.items() if names is None or k in names}, "optim": optim}


def load_shards(ck: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, names: Optional[set[str]] = None) -> None:
    """A checkpoint's sharded weights and optimizer state into a sharded model on any number of ranks:
    torch.distributed.checkpoint reads, on each rank, the pieces of the saved shards its own shard covers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not (Path(ck) / SHARDS).is_dir():
        raise ValueError(f"checkpoint {ck} has no {SHARDS}/ folder: it was not written by a sharded (fsdp) run")
    sd = sharded_state(model, opt, names)
    dcp.load(sd, checkpoint_id=str(Path(ck) / SHARDS))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=StateDictOptions(strict=False))


def rss_gb() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RssPeak:
    """The peak resident memory of this process while training steps run, sampled every 10 ms by a
    thread (ru_maxrss would also hold the model's build before sharding and the checkpoint gathers)."""

    def __init__(self):
        import threading

        self.peak, self._on, self._stop = 0.0, threading.Event(), threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.wait(0.01):
            if self._on.is_set():
                self.peak = max(self.peak, proc.memory_info().rss / 2**30)

    def measuring(self, on: bool) -> None:
        (self._on.set if on else self._on.clear)()

    def close(self) -> float:
        self._stop.set()
        return self.peak


def max_over_ranks(x: float, ctx) -> float:
    """The largest of every rank's x (on the context's device: NCCL reduces only CUDA tensors)."""
    t = torch.tensor([x], dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


class Throughput:
    """Tokens/s of this worker between two log steps, and MFU where the device's peak is known
    (lumo_ray/flops.py). The caller counts tokens (real, not padding), target tokens and sequences as
    it trains, and optionally the input positions computed (padding included): then pad_fraction, the
    share of computed positions that were padding since the last report."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.t, self.tokens, self.positions = time.time(), 0, 0

    def report(self, tokens: int, targets: int, seqs: int, positions: Optional[int] = None) -> dict:
        from lumo_ray.flops import flops_per_token, mfu

        now = time.time()
        rate = (tokens - self.tokens) / max(now - self.t, 1e-9)
        out = {}
        if positions is not None and positions > self.positions:
            out["pad_fraction"] = 1.0 - (tokens - self.tokens) / (positions - self.positions)
            self.positions = positions
        self.t, self.tokens = now, tokens
        per_token = flops_per_token(self.model, max(1, tokens // max(seqs, 1)), targets / max(tokens, 1))
        out.update({"tokens_per_s": rate, "model_tflops_per_s": rate * per_token / 1e12})
        u = mfu(rate, per_token, self.device)
        if u is not None:
            out["mfu"] = u
        return out


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def checkpoint_paths(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(the temp name a checkpoint is written under, its final name)."""
    root = Path(run_dir) / CHECKPOINTS
    return root / f".tmp-step-{step:07d}", root / f"step-{step:07d}"


def commit_checkpoint(tmp: Path, final: Path, keep: int) -> Path:
    """Rename a finished checkpoint to its final name; the newest `keep` stay."""
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(final.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _holds_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return any(_holds_tensor(v) for v in x.values())
    return isinstance(x, (list, tuple)) and any(_holds_tensor(v) for v in x)


def _plain(o: Any) -> Any:
    """json.dumps' fallback: NumPy numbers and arrays (a data position's counters) as Python ones."""
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    raise TypeError(f"checkpoint state: {type(o).__name__} is neither a tensor nor JSON")


def save_checkpoint(run_dir: Path, step: int, state: dict, extra_files: dict[str, str] | None = None,
                    keep: int = 2, fresh: bool = True, digests: dict[str, str] | None = None) -> Path:
    """run_dir/checkpoints/step-NNNNNNN/{state.pt, state.json, meta.json, ..., SHA256SUMS}: the entries of
    `state` that hold tensors in state.pt (read back with weights_only), the rest in state.json; the
    digests last; written to a temp name, then renamed; the newest `keep` stay. fresh=False: the temp
    folder already holds the sharded files (digests: those the other ranks hashed)."""
    from lumo_ray.integrity import write_manifest

    tmp, final = checkpoint_paths(run_dir, step)
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.save({k: v for k, v in state.items() if _holds_tensor(v)}, tmp / CKPT_STATE)
    plain = {k: v for k, v in state.items() if not _holds_tensor(v)}
    (tmp / CKPT_JSON).write_text(json.dumps(plain, default=_plain) + "\n")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    (tmp / "meta.json").write_text(json.dumps({"step": step, "token_space_hash": state.get("token_space_hash")}) + "\n")
    write_manifest(tmp, digests)
    return commit_checkpoint(tmp, final, keep)


def save_sharded_checkpoint(ctx, run_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                            state: Optional[dict], names: Optional[set[str]] = None,
                            extra_files: dict[str, str] | None = None, keep: int = 2) -> Path:
    """train.strategy fsdp, on every rank: each rank writes its own shard of the weights (`names`, else all)
    and of the optimizer state into <checkpoint>/shards (no rank gathers the model), rank 0 `state` (the
    rest: scheduler, RNG, data position). Returns this rank's checkpoint folder: the whole checkpoint
    where the ranks share the run directory; a URI run directory's staging copy is each process's own,
    so there it holds this rank's shard, which the rank reports (Ray Train merges every rank's files)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    tmp, final = checkpoint_paths(run_dir, step)
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    dcp.save(sharded_state(model, opt, names), checkpoint_id=str(tmp / SHARDS))  # ends once .metadata is written
    # each rank hashes its own shard files (rank 0 may not see them: a URI run's staging copy), rank 0
    # lists them all in the checkpoint's SHA256SUMS
    from lumo_ray.integrity import sha256_file

    mine = {f"{SHARDS}/{f.name}": sha256_file(f) for f in sorted((tmp / SHARDS).glob(f"__{dist.get_rank()}_*.distcp"))}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if ctx.rank == 0:
        save_checkpoint(run_dir, step, state, extra_files, keep, fresh=False,
                        digests={k: v for d in every for k, v in d.items()})
    dist.barrier()  # rank 0 has renamed the shared folder
    if ctx.rank != 0 and tmp.exists():  # this process's own copy of the run directory
        commit_checkpoint(tmp, final, keep)
    return final


def rank_files(ck: Path, rank: int) -> Path:
    """The files of checkpoint `ck` that rank `rank` reports to Ray Train: all of them for a DDP checkpoint;
    for a sharded one its own shard files (rank 0: also .metadata and state.pt), so that no two ranks
    upload one file. A folder of hard links beside `ck`; the caller removes it after the report."""
    import re

    if not (ck / SHARDS).is_dir():
        return ck
    view = ck.parent / f".report-{ck.name}-rank{rank}"
    shutil.rmtree(view, ignore_errors=True)
    for f in sorted(p for p in ck.rglob("*") if p.is_file()):
        m = re.fullmatch(r"__(\d+)_\d+\.distcp", f.name)
        if (int(m.group(1)) == rank) if m else rank == 0:
            dst = view / f.relative_to(ck)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dst)
            except OSError:
                shutil.copy2(f, dst)
    return view


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    cks = sorted((Path(run_dir) / CHECKPOINTS).glob("step-*"))
    return cks[-1] if cks else None


def load_state(ck: Path) -> dict:
    """A checkpoint's state: state.pt's tensors (no pickle: weights_only) and state.json. Callers verify
    the checkpoint first (resolve_resume)."""
    from lumo_ray.integrity import IntegrityError, load_tensors

    ck = Path(ck)
    if not (ck / CKPT_JSON).is_file():
        raise IntegrityError("checkpoint", ck, f"no {CKPT_JSON}: not a finished checkpoint of this version",
                             "resume a checkpoint written by this version, or start a fresh run")
    try:
        plain = json.loads((ck / CKPT_JSON).read_text())
    except ValueError as e:
        raise IntegrityError("checkpoint file", ck / CKPT_JSON, f"not JSON ({e})") from None
    return {**load_tensors(ck / CKPT_STATE), **plain}


def resolve_resume(resume: str | None, run_dir: Path, ctx, log: Callable[[str], None] = print) -> Optional[Path]:
    """Ray's restored checkpoint (worker restart) wins; else train.resume: 'auto' (the run directory's
    newest), a checkpoint directory (path or URI), or none. Whatever is chosen is verified against its
    SHA256SUMS before anything of it is read, and a mismatch refused (IntegrityError: one line naming the
    file, exit 2). Only 'auto' falls back: it skips a checkpoint that does not verify, says which and why,
    takes the next older one, and refuses, rather than starting over, when none verifies."""
    from lumo_ray.errors import UserError
    from lumo_ray.integrity import IntegrityError, check, verify

    ck = ctx.restored_checkpoint()
    if resume != "auto":
        if ck is None and resume:
            ck = fetch_checkpoint(resume)
            if not (ck / CKPT_STATE).exists():
                raise UserError("train.resume", resume, f"no {CKPT_STATE} there", "give a checkpoints/step-N folder")
        if ck is not None:
            verify(ck, todo=RESUME_TODO)
        return ck
    cands = ([ck] if ck is not None else []) + sorted((Path(run_dir) / CHECKPOINTS).glob("step-*"), reverse=True)
    skipped = []
    for c in cands:
        why = check(c)
        if why is None:
            if skipped:
                log(f"train.resume=auto: resuming {c}, the newest checkpoint that verifies")
            return c
        log(f"train.resume=auto: skipped {c}: {why}")
        skipped.append(Path(c).name)
    if skipped:
        raise IntegrityError("train.resume=auto", Path(run_dir) / CHECKPOINTS,
                             f"none of {len(skipped)} checkpoints verifies ({', '.join(skipped)}; each logged with why)",
                             "move the folder aside to start a fresh run")
    return None


def check_resume(resume: str | None) -> None:
    """The driver's look at train.resume=<local path> before any worker starts (the workers verify again
    whatever they resume, a URI or Ray Train's restored checkpoint too)."""
    from lumo_ray.integrity import verify
    from lumo_ray.storage import is_uri

    if resume and resume != "auto" and not is_uri(resume) and (Path(resume) / CKPT_STATE).exists():
        verify(resume, todo=RESUME_TODO)


# ------------------------------------------------------------------------------------------------
# Launch and outputs
# ------------------------------------------------------------------------------------------------

def launch(worker_fn: Callable, loop_config: dict, t, storage: str, name: str, address: Optional[str] = None,
           keep: int | None = None, section: str = "train", callbacks: Optional[list] = None):
    """Run worker_fn(loop_config) on t.num_workers Ray Train workers (DDP) with the resources of train
    section `t` (`section` names it in a refusal); `storage` (a path or URI) is Ray's storage_path;
    callbacks: Ray Train's (a Tune trial's TuneReportCallback). Returns the Ray Train Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_env import init_ray, train_logging
    from pipelines.status import require_fit

    from lumo_ray.resources import train_resources
    from lumo_ray.storage import ray_storage

    workers = train_resources(t, section)
    check_resume(getattr(t, "resume", None))  # before Ray: a refusal is the command's one line
    init_ray(address)
    require_fit([workers])
    # Ray picks NCCL for GPU workers; a torch built without it (a CPU wheel: the workers run this same
    # install) gets gloo, so GPU ids without CUDA (a fake-GPU test cluster) still train, on CPU.
    backend = None if not workers.gpus or torch.distributed.is_nccl_available() else "gloo"
    trainer = TorchTrainer(
        worker_fn, train_loop_config=loop_config, torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=bool(workers.gpus),
                                     resources_per_worker={"CPU": workers.cpus},
                                     accelerator_type=workers.accelerator_type or None),
        run_config=RunConfig(**ray_storage(storage), name=name, failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep), logging_config=train_logging(),
                             callbacks=callbacks))
    result = trainer.fit()
    print(f"[train] {section} rank 0 computed on {(result.metrics or {}).get('placement', '?')}", flush=True)
    return result


def storage_of(t, run_dir: str | Path) -> str:
    """Ray Train's storage_path of a run: train.storage_path, else <run>/ray (a path or URI)."""
    from lumo_ray.storage import locate, resolve

    return resolve(t.storage_path) if t.storage_path else str(locate(run_dir) / "ray")


def write_json(path: Path, obj: Any) -> Path:
    from lumo_ray.storage import write_file  # temp + rename: a symlink planted at `path` is never followed

    write_file(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path
