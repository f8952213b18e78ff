"""The stage-1 VLM: SigLIP vision tower -> (LayerNorm) -> Perceiver resampler -> MLP projector ->
Qwen3 causal LM, with visual embeddings injected at the `<image>` placeholder positions.

`<image>` expands to `<im_start>` + N image-pad ids + `<im_end>` (N = resampler latents). The pad
ids are replaced by the projected visual tokens in order: image k of a sample fills its k-th run of
N pads. Plain PyTorch (no Ray): build, freeze, forward, token losses, greedy generation, export.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LumoConfig, TextConfig, to_dict
from ..config.vlm import VLMConfig
from ..integrity import verify, write_manifest
from ..storage import staged_dir, write_file
from .presets import pad_to, tiny_qwen3_config, tiny_siglip_vision_config

IMAGE_TOKEN, IM_START, IM_END = "<image>", "<im_start>", "<im_end>"
EXPORT_FORMAT = "lumo-vlm-connector/1"


class VLMInputError(ValueError):
    """A batch that does not match the model (placeholder / image count mismatch): names the sample."""


@dataclass
class VLMTokens:
    """Ids the VLM adds after the text tokenizer's own ids (they never collide with text ids)."""
    image_pad: int
    im_start: int
    im_end: int
    eos: int
    pad: int
    vocab_rows: int
    """Rows of the LLM embedding matrix (>= every id above)."""


class PerceiverResampler(nn.Module):
    """Flamingo-style resampler: N learned latents cross-attend to [patch features; latents]."""

    def __init__(self, in_dim: int, dim: int, latents: int, depth: int, heads: int, ff_mult: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"resampler dim {dim} is not divisible by heads {heads}")
        self.proj_in = nn.Linear(in_dim, dim)
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "ln_media": nn.LayerNorm(dim), "ln_latents": nn.LayerNorm(dim),
                "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                "ln_ff": nn.LayerNorm(dim),
                "ff": nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim)),
            }))
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [B, P, in] -> [B, N, dim]
        x = self.proj_in(feats)
        lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for b in self.blocks:
            q = b["ln_latents"](lat)
            kv = torch.cat([b["ln_media"](x), q], dim=1)
            lat = lat + b["attn"](q, kv, kv, need_weights=False)[0]
            lat = lat + b["ff"](b["ln_ff"](lat))
        return self.ln_out(lat)


class Connector(nn.Module):
    """Everything the align stage trains: optional patch LayerNorm, resampler, projector."""

    def __init__(self, vision_dim: int, llm_dim: int, cfg: VLMConfig):
        super().__init__()
        r = cfg.resampler
        self.layernorm = nn.LayerNorm(vision_dim) if cfg.vision.layernorm else nn.Identity()
        self.resampler = PerceiverResampler(vision_dim, r.dim, r.latents, r.depth, r.heads, r.ff_mult)
        hidden = cfg.projector.hidden or llm_dim
        self.projector = nn.Sequential(nn.Linear(r.dim, hidden), nn.GELU(), nn.Linear(hidden, llm_dim))

    def forward(self, patch_feats: torch.Tensor) -> torch.Tensor:
        return self.projector(self.resampler(self.layernorm(patch_feats)))


class VLM(nn.Module):
    def __init__(self, vision: nn.Module, connector: Connector, llm: nn.Module, tokens: VLMTokens,
                 n_visual: int, feature_layer: int = -1):
        super().__init__()
        self.vision, self.connector, self.llm = vision, connector, llm
        self.tokens, self.n_visual, self.feature_layer = tokens, n_visual, feature_layer
        self.frozen: tuple[str, ...] = ()

    # -- freezing --------------------------------------------------------------------------
    def apply_stage(self, stage: str) -> dict:
        """Freeze by stage; returns trainable / frozen parameter counts (per part and total)."""
        if stage != "align":
            raise ValueError(f"unknown stage {stage!r} (valid: align)")
        self.frozen = ("vision", "llm")
        for name in ("vision", "connector", "llm"):
            for p in getattr(self, name).parameters():
                p.requires_grad_(name not in self.frozen)
        self.train(self.training)
        return param_counts(self)

    def train(self, mode: bool = True):  # frozen parts always stay in eval mode (no dropout)
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    # -- forward ---------------------------------------------------------------------------
    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_img, 3, S, S] -> vision tower patch features [n_img, P, vision_hidden]."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and "vision" not in self.frozen):
            out = self.vision(pixel_values=pixel_values, output_hidden_states=self.feature_layer != -1)
            return out.last_hidden_state if self.feature_layer == -1 else out.hidden_states[self.feature_layer]

    def encode_images(self, pixel_values: torch.Tensor, connector: Optional[nn.Module] = None) -> torch.Tensor:
        """[n_img, 3, S, S] -> projected visual tokens [n_img, N, llm_hidden]. `connector` may be a
        DDP wrapper of self.connector (training) so gradients are synchronised."""
        if pixel_values.shape[0] == 0:
            return pixel_values.new_zeros(0, self.n_visual, self.llm.config.hidden_size)
        return (connector or self.connector)(self.patch_features(pixel_values))

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor, image_counts: Sequence[int],
              sample_ids: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Token embeddings with the image-pad positions filled by `visual` in order."""
        mask = input_ids == self.tokens.image_pad
        per_row = mask.sum(dim=1).tolist()
        for i, (got, k) in enumerate(zip(per_row, image_counts)):
            if got != k * self.n_visual:
                name = sample_ids[i] if sample_ids else f"row {i}"
                raise VLMInputError(f"sample {name}: {got} image-pad ids but {k} image(s) x "
                                    f"{self.n_visual} visual tokens = {k * self.n_visual}")
        if visual.shape[0] != sum(image_counts):
            raise VLMInputError(f"batch has {visual.shape[0]} images but image_counts sum to {sum(image_counts)}")
        emb = self.llm.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        return emb.masked_scatter(mask.unsqueeze(-1), visual.to(emb.dtype).reshape(-1, emb.shape[-1]))

    def forward(self, input_ids, attention_mask, pixel_values, image_counts, sample_ids=None,
                visual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, V]. `visual` overrides the image embeddings (ablations)."""
        if visual is None:
            visual = self.encode_images(pixel_values)
        emb = self.embed(input_ids, visual, image_counts, sample_ids)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding safe
        return self.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=pos,
                        use_cache=False).logits

    def token_losses(self, batch: dict, visual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (sum of caption-token CE, number of label tokens), both [B]."""
        logits = self(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                      batch["image_counts"], batch.get("ids"), visual=visual)
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=-100, reduction="none").view(labels.shape)
        return ce.sum(dim=1), (labels != -100).sum(dim=1)

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy captions for a left-padded prompt batch; each list runs until EOS (excluded)."""
        emb = self.embed(batch["input_ids"], self.encode_images(batch["pixel_values"]),
                         batch["image_counts"], batch.get("ids"))
        am = batch["attention_mask"].long()
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=emb, attention_mask=am, position_ids=pos, use_cache=True)
        past, nxt = out.cache, out.logits[:, -1].argmax(-1)
        done = torch.zeros_like(nxt, dtype=torch.bool)
        result: list[list[int]] = [[] for _ in range(emb.shape[0])]
        for _ in range(max_new_tokens):
            done |= nxt == self.tokens.eos
            if bool(done.all()):
                break
            for i in range(len(result)):
                if not done[i]:
                    result[i].append(int(nxt[i]))
            am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.llm(input_ids=nxt[:, None], attention_mask=am, position_ids=pos,
                           cache=past, use_cache=True)
            past, nxt = out.cache, out.logits[:, -1].argmax(-1)
        return result


def param_counts(model: VLM) -> dict:
    out: dict = {}
    for name in ("vision", "connector", "llm"):
        ps = list(getattr(model, name).parameters())
        out[name] = {"trainable": sum(p.numel() for p in ps if p.requires_grad),
                     "frozen": sum(p.numel() for p in ps if not p.requires_grad)}
    out["trainable"] = sum(v["trainable"] for v in out.values())
    out["frozen"] = sum(v["frozen"] for k, v in out.items() if isinstance(v, dict))
    return out


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------

def build_text(cfg: VLMConfig) -> Any:
    from ..codecs.text import build_text_adapter
    return build_text_adapter(TextConfig(tokenizer=cfg.llm.tokenizer))


def _vision_tower(cfg: VLMConfig) -> nn.Module:
    from transformers import SiglipVisionModel

    if cfg.vision.model == "tiny":
        torch.manual_seed(cfg.vision.seed)
        return SiglipVisionModel(tiny_siglip_vision_config(cfg.vision.image_size))
    m = SiglipVisionModel.from_pretrained(cfg.vision.model, local_files_only=True)
    if m.config.image_size != cfg.vision.image_size:
        raise ValueError(f"{cfg.vision.model}: checkpoint image_size {m.config.image_size} != "
                         f"vlm.vision.image_size {cfg.vision.image_size}")
    return m


def _llm(cfg: VLMConfig, n_text: int) -> nn.Module:
    from transformers import Qwen3ForCausalLM

    if cfg.llm.model == "tiny":
        torch.manual_seed(cfg.llm.seed)
        return Qwen3ForCausalLM(tiny_qwen3_config(pad_to(n_text + 3)))
    from ..storage import fetch_run, is_uri

    # real checkpoints only from local files / the user's cache / the run's object store (a text
    # warm-up in a URI run directory): never a hub download at run time
    path = str(fetch_run(cfg.llm.model)) if is_uri(cfg.llm.model) else cfg.llm.model
    return Qwen3ForCausalLM.from_pretrained(path, local_files_only=True)


def build_vlm(cfg: VLMConfig, text: Any, seed: int = 0) -> VLM:
    """The model with frozen parts built deterministically (preset + seed, or a checkpoint) and the
    connector initialised from `seed`. Global torch RNG is left untouched."""
    n_text = text.vocab_size
    with torch.random.fork_rng(devices=[]):
        vision = _vision_tower(cfg)
        llm = _llm(cfg, n_text)
        rows = llm.get_input_embeddings().weight.shape[0]
        if rows < n_text + 3:  # real checkpoints usually have spare padded rows; else grow
            llm.resize_token_embeddings(pad_to(n_text + 3))
            rows = llm.get_input_embeddings().weight.shape[0]
        torch.manual_seed(seed)
        connector = Connector(vision.config.hidden_size, llm.config.hidden_size, cfg)
    return VLM(vision, connector, llm, vlm_tokens(text, rows), cfg.resampler.latents, cfg.vision.feature_layer)


def vlm_tokens(text: Any, vocab_rows: int = -1) -> VLMTokens:
    """The extra ids follow the tokenizer's own (len(tokenizer) + 0/1/2)."""
    n = text.vocab_size
    return VLMTokens(image_pad=n, im_start=n + 1, im_end=n + 2, eos=int(text.eos_id),
                     pad=int(text.pad_id if text.pad_id is not None else text.eos_id), vocab_rows=vocab_rows)


# ------------------------------------------------------------------------------------------------
# Export: connector weights + references to the frozen parts
# ------------------------------------------------------------------------------------------------

def save_export(model: VLM, cfg: VLMConfig, out_dir: str | Path, extra: Optional[dict] = None,
                connector: Optional[dict] = None) -> Path:
    """save_pretrained-style directory: model.safetensors (connector only: `connector`, else the model's)
    + config.json naming the frozen vision tower / LLM / tokenizer (preset + seed or checkpoint id) and
    the token ids."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in (connector or model.connector.state_dict()).items()}
    write_file(out / "model.safetensors", save(state, metadata={"format": EXPORT_FORMAT}))
    doc = {"format": EXPORT_FORMAT,
           "frozen": {"vision": {"model": cfg.vision.model, "seed": cfg.vision.seed,
                                 "class": "SiglipVisionModel"},
                      "llm": {"model": cfg.llm.model, "seed": cfg.llm.seed, "class": "Qwen3ForCausalLM"},
                      "tokenizer": cfg.llm.tokenizer},
           "tokens": asdict(model.tokens), "n_visual": model.n_visual,
           "vlm": to_dict(cfg), **(extra or {})}
    write_file(out / "config.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")
    write_manifest(out)  # last: the digests of what the folder holds (lumo_ray/integrity.py)
    return out


def load_export(export_dir: str | Path) -> tuple[VLM, VLMConfig, Any]:
    """Rebuild the frozen parts from their references and load the connector weights."""
    from safetensors.torch import load_file

    from ..config import build

    d = Path(export_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d}: not a VLM export (no config.json)")
    verify(d, "VLM export", "train the run again (its trainer writes SHA256SUMS)")
    doc = json.loads((d / "config.json").read_text())
    if doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{d / 'config.json'}: format {doc.get('format')!r}, expected {EXPORT_FORMAT}")
    cfg = build(VLMConfig, doc["vlm"], str(d / "config.json"), prefix="vlm.")
    text = build_text(cfg)
    model = build_vlm(cfg, text)
    if asdict(model.tokens) != doc["tokens"]:
        raise ValueError(f"{d}: token ids {doc['tokens']} differ from the rebuilt model's {asdict(model.tokens)}")
    model.connector.load_state_dict(load_file(str(d / "model.safetensors")))
    model.apply_stage(cfg.train.stage)
    return model.eval(), cfg, text


def lumo_vlm_config(cfg: LumoConfig | VLMConfig) -> VLMConfig:
    return cfg.vlm if isinstance(cfg, LumoConfig) else cfg


# ------------------------------------------------------------------------------------------------
# Tiny-preset text warm-up (a stand-in for a pretrained LLM)
# ------------------------------------------------------------------------------------------------

def text_warmup(cfg: VLMConfig, text: Any, seqs: Sequence[tuple[list[int], list[int]]], out_dir: str | Path,
                log=print) -> Path:
    """Train the tiny random LM on (ids, labels) sequences and save it with save_pretrained.
    Deterministic for cfg.llm.seed; CPU, seconds for the tiny preset."""
    if cfg.llm.model != "tiny":
        raise ValueError(f"llm.text_warmup_steps is for the tiny preset only (llm.model={cfg.llm.model!r})")
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        llm = _llm(cfg, text.vocab_size)
        torch.manual_seed(cfg.llm.seed)
        opt = torch.optim.AdamW(llm.parameters(), lr=cfg.llm.text_warmup_lr, weight_decay=0.0)
        steps, bs = cfg.llm.text_warmup_steps, 32
        pad = int(text.pad_id if text.pad_id is not None else text.eos_id)
        llm.train()
        for step in range(steps):
            idx = torch.randint(len(seqs), (bs,)).tolist()
            T = max(len(seqs[i][0]) for i in idx)
            ids = torch.full((bs, T), pad, dtype=torch.long)
            labels = torch.full((bs, T), -100, dtype=torch.long)
            am = torch.zeros((bs, T), dtype=torch.long)
            for r, i in enumerate(idx):
                n = len(seqs[i][0])
                ids[r, :n], labels[r, :n], am[r, :n] = torch.tensor(seqs[i][0]), torch.tensor(seqs[i][1]), 1
            loss = llm(input_ids=ids, attention_mask=am, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
            for g in opt.param_groups:
                g["lr"] = cfg.llm.text_warmup_lr * min(1.0, (step + 1) / 10) * (1 - step / steps * 0.9)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step + 1 == steps or step % 100 == 0:
                log(f"[vlm] text warm-up of the tiny LLM: step {step + 1}/{steps} loss {loss.item():.4f}")
    llm.eval()
    with staged_dir(out) as tmp:  # save_pretrained's own writes land in a folder of ours, then move in
        llm.save_pretrained(str(tmp))
    write_file(out / "lumo_text_warmup.json", json.dumps(
        {"steps": steps, "lr": cfg.llm.text_warmup_lr, "seed": cfg.llm.seed, "sequences": len(seqs)}) + "\n")
    return out
