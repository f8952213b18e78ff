"""Warm start of a causal LM on the extended vocabulary (docs/stage3_token_lm.md).

Resize input embeddings and output head to the token space's padded size; rows beyond TEXT are
"new": initialised as the mean of the TEXT rows plus noise (init_scale x the TEXT rows' per-dim
std). Freeze modes: new_rows (only new rows of embeddings and head get gradient, via a gradient
mask), lora (peft adapters + new rows), full.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..integrity import MANIFEST, verify, write_manifest
from ..storage import staged_dir
from ..token_space import TokenSpace, TokenSpaceError
from .base_lm import build_base_lm

META = "lumo_token_lm.json"
EXPORT_TODO = "train or export it again (both write SHA256SUMS)"


@dataclass
class WarmStart:
    model: torch.nn.Module
    ts: TokenSpace
    freeze: str
    counts: dict
    """total / trainable parameters, and effective trainable (new rows only where masked)."""
    fill: Optional[Callable[[torch.nn.Module, torch.device], None]] = None
    """A meta-device model's materialiser (meta_warm_start): call fill(model, device) after fully_shard."""


def load_causal_lm(base: str, text_vocab: int, seed: int = 0) -> torch.nn.Module:
    """A preset name ('tiny', 'small', 'qwen3-0.6b') -> that random-init Qwen3 with `text_vocab` rows; else a local dir, an object-store
    URI of an export directory (downloaded once per process), or a hub id."""
    from .base_lm import PRESETS

    if base in PRESETS:
        return build_base_lm(base, text_vocab, seed=seed)
    from transformers import AutoModelForCausalLM

    from ..storage import fetch_run, is_uri

    if is_uri(base):
        base = str(fetch_run(base))
    if (Path(base) / MANIFEST).is_file():  # lumo's exports carry one; a Hugging Face folder from elsewhere not
        verify(base, "base LM export", EXPORT_TODO)
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _new_rows(old: torch.Tensor, n: int, text_vocab: int, init_scale: float, gen: torch.Generator) -> torch.Tensor:
    w = old[:text_vocab].detach().float()
    noise = torch.randn(n - text_vocab, w.shape[1], generator=gen) * (init_scale * w.std(0))
    return (w.mean(0) + noise).to(old.dtype)


def _extended(old: torch.Tensor, n: int, text_vocab: int, init_scale: float, seed: int, head: bool) -> torch.Tensor:
    """extend_vocab's embedding (head: its untied head) from the base's: the TEXT rows, then new rows."""
    gen = torch.Generator().manual_seed(seed)
    if head:  # extend_vocab draws the embedding's new rows first
        torch.randn(n - text_vocab, old.shape[1], generator=gen)
    return torch.cat([old[:text_vocab], _new_rows(old, n, text_vocab, init_scale, gen)])


def extend_vocab(model: torch.nn.Module, ts: TokenSpace, init_scale: float, seed: int = 0) -> torch.nn.Module:
    """Resize embeddings and head to ts.padded_size; (re)initialise every row >= ts.text_vocab."""
    t, n = ts.text_vocab, ts.padded_size
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < t:
        raise TokenSpaceError(f"base LM has {emb.weight.shape[0]} embedding rows, fewer than the token space's "
                              f"TEXT range ({t}): the base LM was trained with another tokenizer")
    gen = torch.Generator().manual_seed(seed)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    old_emb = emb.weight.detach().clone()
    head = model.get_output_embeddings()
    old_head = None if tied or head is None else head.weight.detach().clone()
    model.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        e = model.get_input_embeddings().weight
        e[:t] = old_emb[:t]
        e[t:] = _new_rows(old_emb, n, t, init_scale, gen)
        if old_head is not None:
            h = model.get_output_embeddings().weight
            h[:t] = old_head[:t]
            h[t:] = _new_rows(old_head, n, t, init_scale, gen)
    model.config.vocab_size = n
    return model


def _row_mask_hook(text_vocab: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        g[:text_vocab] = 0
        return g
    return hook


def vocab_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Embedding and (untied) head weights: the parameters that hold new rows."""
    ps = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not ps[0]:
        ps.append(head.weight)
    return ps


def apply_freeze(model: torch.nn.Module, freeze: str, text_vocab: int, lora=None) -> torch.nn.Module:
    """Set requires_grad (and masks) per freeze mode. Returns the model (peft-wrapped for lora)."""
    if freeze == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if freeze == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), bias="none"))
    elif freeze == "new_rows":
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        raise ValueError(f"unknown freeze mode {freeze!r}: new_rows, lora or full")
    for p in vocab_params(model):
        p.requires_grad_(True)
        p.register_hook(_row_mask_hook(text_vocab))  # text rows never move: no gradient, so no Adam update
    return model


def trainable_counts(model: torch.nn.Module, freeze: str, text_vocab: int) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    effective = trainable
    if freeze != "full":
        effective -= sum(text_vocab * p.shape[1] for p in vocab_params(model))
    return {"total": total, "trainable": trainable, "effective_trainable": effective, "freeze": freeze}


def init_export(init: str) -> Path:
    """The export directory of a token-LM run given as the run directory (path or URI) or its export/."""
    from ..storage import fetch_run, is_uri

    d = fetch_run(init) if is_uri(init) else Path(init)
    for cand in (d / "export", d):
        if (cand / "token_space.json").exists():
            verify(cand, "token-LM export", EXPORT_TODO)
            return cand
    raise FileNotFoundError(f"{init}: neither it nor its export/ holds a token-LM export (token_space.json)")


def warm_start(base: str, ts: TokenSpace, freeze: str = "new_rows", init_scale: float = 0.02, seed: int = 0,
               lora=None, log=print, init: str = "", meta: bool = False) -> WarmStart:
    """Load `base`, extend it to the token space and apply the freeze mode; logs trainable counts.
    init: a token-LM run (stage 4 starts from stage 3.3) whose extended vocabulary is loaded as it is,
    after refusing another token space. meta: the same model built on the meta device, to be filled
    shard by shard after fully_shard (WarmStart.fill; train.meta_init under fsdp)."""
    fill = None
    if meta:
        model, fill = meta_warm_start(base, ts, freeze, init_scale, seed, lora, init)
    elif init:
        model = load_token_lm(init_export(init), expected=ts)[0].train()
    else:
        model = extend_vocab(load_causal_lm(base, ts.text_vocab, seed), ts, init_scale, seed)
    if not meta:
        model = apply_freeze(model, freeze, ts.text_vocab, lora)
    if init:
        base = f"{init} (token-LM export)"
    counts = trainable_counts(model, freeze, ts.text_vocab)
    log(f"token LM warm start from {base}: vocab {ts.text_vocab} -> {ts.padded_size} rows, freeze={freeze}, "
        f"params {counts['total']:,}, trainable {counts['trainable']:,} "
        f"(effective {counts['effective_trainable']:,})" + (" (meta device)" if meta else ""))
    return WarmStart(model, ts, freeze, counts, fill)


def _checkpoint_dir(base: str) -> Path:
    """A base checkpoint's local directory: itself, an object-store URI's download, a hub id's snapshot."""
    from ..storage import fetch_run, is_uri

    d = fetch_run(base) if is_uri(base) else Path(base)
    if not d.is_dir():  # a hub id: its config and safetensors in the local cache (from_pretrained's download)
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors"]))
    if (d / MANIFEST).is_file():  # as load_causal_lm
        verify(d, "base LM export", EXPORT_TODO)
    return d


def _config_model(d: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d)), dtype=torch.float32).train()


def meta_warm_start(base: str, ts: TokenSpace, freeze: str, init_scale: float, seed: int, lora, init: str = ""):
    """warm_start's model on the meta device, and the Filler that gives each rank its shards of the same
    values after fully_shard: a preset's random init replayed one weight at a time (meta_init.replay), a
    checkpoint's (or token-LM export's) safetensors read tensor by tensor, each rank only its rows; the
    new vocabulary rows and LoRA's init drawn as warm_start draws them. Returns (model, fill)."""
    from .base_lm import PRESETS
    from .meta_init import Filler, named_states, read_tensor, recording, replay, safetensors_files

    t, n = ts.text_vocab, ts.padded_size
    files = None
    with recording() as build:
        if init:
            d = init_export(init)
            ts.ensure_same(TokenSpace.load(d), what=f"token LM {d} token space")
            model, files = _config_model(d), safetensors_files(d)
        elif base in PRESETS:
            model = build_base_lm(base, t, seed=seed)
        else:
            d = _checkpoint_dir(base)
            model, files = _config_model(d), safetensors_files(d)
    base_params = dict(model.named_parameters())
    meta_states = {k: v for k, v in named_states(model).items() if v.is_meta}
    old: list[torch.Tensor] = []  # the base's embedding (and untied head), replaced by the resize
    with recording() as after:
        if not init:
            emb = model.get_input_embeddings().weight
            if emb.shape[0] < t:
                raise TokenSpaceError(f"base LM has {emb.shape[0]} embedding rows, fewer than the token space's "
                                      f"TEXT range ({t}): the base LM was trained with another tokenizer")
            old = vocab_params(model)
            model.resize_token_embeddings(n, mean_resizing=False)
            model.config.vocab_size = n
        elif model.get_input_embeddings().weight.shape[0] != n:
            raise TokenSpaceError(f"{init}: model has {model.get_input_embeddings().weight.shape[0]} rows, "
                                  f"token space padded size is {n}")
        model = apply_freeze(model, freeze, t, lora)
    final = {id(v): k for k, v in named_states(model).items()}
    new = [final[id(p)] for p in vocab_params(model)] if old else []

    def put(target, p: torch.Tensor, value: torch.Tensor, rows_given: bool = False) -> None:
        i = next((j for j, q in enumerate(old) if q is p), None)
        if i is None:
            target.put(final[id(p)], value, rows_given)
        else:
            target.put(new[i], _extended(value, n, t, init_scale, seed, head=i == 1))

    def base_values(target) -> None:
        if files is None:  # a preset: build_base_lm's draws, under its seed
            replay(build, {id(v): k for k, v in meta_states.items()}, lambda k, v: put(target, meta_states[k], v), seed)
            return
        for k, p in base_params.items():  # every weight from the files, a rank its rows (the vocabulary whole)
            whole = any(q is p for q in old)
            put(target, p, read_tensor(files, k, None if whole else target.rows(final[id(p)])), rows_given=not whole)

    produced = {final[id(p)] for p in base_params.values() if id(p) in final} | set(new)
    drawn = {i: k for i, k in final.items() if k not in produced}  # LoRA's weights: drawn after the base
    return model, Filler([base_values, lambda target: replay(after, drawn, target.put)])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP and merge LoRA: the plain causal LM to export."""
    model = getattr(model, "module", model)
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    return model


def export(model: torch.nn.Module, ts: TokenSpace, out_dir: str | Path, meta: dict, tokenizer=None,
           sharded: bool = False, write: bool = True) -> Path:
    """HF directory (save_pretrained) + token_space.json + lumo_token_lm.json (+ the text tokenizer).
    sharded: an FSDP-sharded model, written one gathered weight at a time (sharded_export): every rank
    calls export, the one with write=True (rank 0) writes."""
    from .sharded_export import save_sharded_pretrained

    out = Path(out_dir)
    if sharded and not write:
        save_sharded_pretrained(model, None)
        return out
    # written into a fresh folder of our own, then moved onto out/ name by name: a symlink planted
    # at an export name (or at out/ itself) is replaced or refused, never written through
    with staged_dir(out) as tmp:
        if sharded:
            save_sharded_pretrained(model, tmp)
        else:
            unwrap(model).save_pretrained(str(tmp), safe_serialization=True)
        ts.save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / META).write_text(json.dumps({**meta, "text_vocab": ts.text_vocab, "padded_size": ts.padded_size,
                                            "token_space_hash": ts.hash}, indent=2) + "\n")
        write_manifest(tmp)  # last: the digests of what was written (integrity.py)
    return out


def load_token_lm(export_dir: str | Path, expected: Optional[TokenSpace] = None) -> tuple[torch.nn.Module, TokenSpace, dict]:
    """(model, token space, meta) of an exported token LM; refuses another token space than `expected`."""
    from transformers import AutoModelForCausalLM

    d = Path(export_dir)
    if not (d / "token_space.json").exists():
        raise FileNotFoundError(f"{d}: no token_space.json (not a token-LM export)")
    verify(d, "token-LM export", EXPORT_TODO)
    ts = TokenSpace.load(d)
    if expected is not None:
        expected.ensure_same(ts, what=f"token LM {d} token space")
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    if model.get_input_embeddings().weight.shape[0] != ts.padded_size:
        raise TokenSpaceError(f"{d}: model has {model.get_input_embeddings().weight.shape[0]} rows, "
                              f"token space padded size is {ts.padded_size}")
    meta = json.loads((d / META).read_text()) if (d / META).exists() else {}
    return model, ts, meta


def target_losses(model: torch.nn.Module, batch: dict, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed CE over target tokens and target token counts, for a right-padded batch
    (attention_mask) or a packed one (position_ids: several samples per row, attention kept within
    each). The head runs only at the positions that predict a target (logits_to_keep): x2t targets
    are a few tokens of a long sequence."""
    dev = next(model.parameters()).device
    ids = batch["input_ids"].to(dev)
    labels = batch["labels"].to(dev)
    owner = batch.get("sample_index")  # hand-made batches without it: one sample per row
    owner = torch.arange(ids.shape[0], device=dev)[:, None].expand_as(ids) if owner is None else owner.to(dev)
    tgt_all = labels[:, 1:]
    keep = torch.nonzero((tgt_all != -100).any(0)).flatten()  # positions p predicting label p + 1
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=dev)
    if "position_ids" in batch:  # no mask and no cache: transformers masks per run of positions 0, 1, ...
        inputs = {"position_ids": batch["position_ids"].to(dev), "use_cache": False}
    else:
        inputs = {"attention_mask": batch["attention_mask"].to(dev)}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and dev.type == "cuda"):
        logits = model(input_ids=ids, logits_to_keep=keep, **inputs).logits
    logits, tgt = logits.float(), tgt_all[:, keep]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="none")
    on = tgt.reshape(-1) != -100
    who = owner[:, 1:][:, keep].reshape(-1)[on]  # the sample whose label each target is
    k = len(batch["tasks"]) if "tasks" in batch else ids.shape[0]
    loss = torch.zeros(k, dtype=ce.dtype, device=dev).index_add(0, who, ce[on])
    return loss, torch.zeros(k, dtype=torch.long, device=dev).index_add(0, who, torch.ones_like(who))


LOSS_TASKS = ("a2t", "i2t", "t2a", "t2i", "t")  # the order of the per-task loss sums (all-reduced as one tensor)


def task_loss_sums(model, builder, samples: list[dict], batch_size: int = 16, autocast: bool = False,
                   batches: int = 0) -> torch.Tensor:
    """[len(LOSS_TASKS), 2] float64 (summed target CE, target tokens) per task over `samples`, each in
    its own layout and in the reverse one when the sequence config trains both directions. batches:
    run at least this many forwards, repeating the last batch uncounted (sharded ranks must match).
    Batches are packed when the sequence config packs (the same sums)."""
    tot = torch.zeros(len(LOSS_TASKS), 2, dtype=torch.float64)
    pairs = [(s, task) for s in samples for task in builder.tasks_of(s)]
    batch = None
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            batch = builder.batch([builder.build(s, task=task) for s, task in pairs[i: i + batch_size]])
            loss, n = target_losses(model, batch, autocast)
            for task, l, k in zip(batch["tasks"], loss.tolist(), n.tolist()):
                tot[LOSS_TASKS.index(task)] += torch.tensor([l, k], dtype=torch.float64)
        for _ in range(batches - -(-len(pairs) // batch_size)):
            if batch is None:
                raise ValueError("this rank has no eval samples to pad its forwards with")
            target_losses(model, batch, autocast)
    return tot


def task_loss_means(tot: torch.Tensor) -> dict:
    """Per-task mean target loss, and "all": the token-weighted mean over every task."""
    out = {t: float(tot[i, 0] / tot[i, 1]) for i, t in enumerate(LOSS_TASKS) if tot[i, 1] > 0}
    out["all"] = float(tot[:, 0].sum() / max(1.0, float(tot[:, 1].sum())))
    return out
