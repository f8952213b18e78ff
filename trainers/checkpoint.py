"""The one checkpoint layout (run_dir/checkpoints/step-NNNNNNN/, SHA256SUMS last): save, commit,
find, verify, load and resume; Ray Train's persisted checkpoints fetched back."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .fsdp import sharded_state
from .loop import set_rng_state

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


def latest_ray_checkpoint(storage: str | Path, name: str = "train") -> Optional[str]:
    """The newest checkpoint (path or URI) Ray Train persisted under `storage`/`name`."""
    from lumo_ray.storage import latest_ray_checkpoint as latest

    last = latest(storage, name, CKPT_STATE)
    return str(last) if last else None


def fetch_checkpoint(p: str | Path) -> Path:
    """A local directory holding checkpoint `p`: itself, or a download of a URI into a temp directory."""
    from lumo_ray.storage import download_dir, is_uri

    return download_dir(p, tempfile.mkdtemp(prefix="lumo-ckpt-")) if is_uri(str(p)) else Path(p)




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


def save_training(ctx, run_dir: Path, step: int, sharded: bool, model: torch.nn.Module, opt, state: dict,
                  weights: Callable[[], dict], names: Optional[set[str]] = None,
                  extra_files: dict[str, str] | None = None) -> Optional[Path]:
    """The one checkpoint save every trainer runs, the mirror of restore_training: under fsdp every rank
    writes its shard of the weights (`names`, else all) and optimizer, rank 0 `state` (scheduler, RNG, step,
    data position, config); else rank 0 writes `state`, `weights()` (the trainer's own part: {'model'},
    {'trainable'} or {'connector'}) and the optimizer. Returns this rank's checkpoint folder (None: none)."""
    if sharded:
        return save_sharded_checkpoint(ctx, run_dir, step, model, opt, state if ctx.rank == 0 else None, names,
                                       extra_files)
    if ctx.rank != 0:
        return None
    return save_checkpoint(run_dir, step, {**state, **weights(), "optimizer": opt.state_dict()}, extra_files)


def restore_training(ck: Path, st: dict, section: str, sharded: bool, model: torch.nn.Module, opt, sched,
                     load_weights: Callable[[dict], None], names: Optional[set[str]] = None, rank: int = 0) -> None:
    """The one restore every trainer runs, from a checkpoint's loaded state `st`: refuse another strategy;
    the weights (under fsdp each rank reads its shard, whatever the worker count that wrote them; else
    `load_weights(st)`, the trainer's own part of the state) and the optimizer; the scheduler; the RNG
    (a per-rank list gives this rank's, or rank 0's when the world grew)."""
    kind, want = st.get("strategy", "ddp"), "fsdp" if sharded else "ddp"
    if kind != want:
        raise ValueError(f"checkpoint {ck} was written with {section}.strategy {kind}; resume it with {kind} "
                         f"(this run: {want})")
    if sharded:
        load_shards(ck, model, opt, names)
    else:
        load_weights(st)
        opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    rng = st["rng"]
    set_rng_state((rng[rank] if rank < len(rng) else rng[0]) if isinstance(rng, list) else rng)
