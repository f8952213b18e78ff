"""Image-caption data for the stage-1 VLM: records -> token sequences, images, batches, splits.

- Sequence: template(prompt) with each `<image>` expanded to <im_start> + N pads + <im_end>, then
  caption + EOS. Labels cover the caption and EOS only. Sequences longer than `max_seq_len` are cut
  on the caption side; a prompt that alone does not fit keeps its images and gets zero labels
  (counted, never silently dropped).
- Eval split: stratified by caption label-length bucket, over image groups (a group never straddles
  the splits), persisted as JSON (id, bucket, label length). Golden set drawn from eval only.
- Data order: a seeded permutation per epoch; step s of the run takes global batch s, cut into
  equal per-rank / per-micro-batch slices (every rank gets the same number of batches).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..codecs.base import MediaError
from ..config.vlm import VLMDataConfig
from ..storage import write_file
from .manifest import Record
from .readers import read_source

IMAGE_TOKEN = "<image>"
MEAN, STD = 0.5, 0.5  # SigLIP normalisation


class VLMDataError(ValueError):
    """A sample or dataset that cannot be used: the message names the sample / file."""


@dataclass
class VLMSample:
    id: str
    group: str
    caption: str
    image_paths: list[str]
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    label_len: int = 0
    bucket: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return next((i for i, lab in enumerate(self.labels) if lab != -100), len(self.labels))


# ------------------------------------------------------------------------------------------------
# Records and sequences
# ------------------------------------------------------------------------------------------------

def load_records(cfg: VLMDataConfig) -> list[Record]:
    """Image-caption records (sorted by id); reader errors are reported, not dropped silently."""
    records, errors = read_source(cfg.source, cfg.path)
    records = sorted((r for r in records if r.media_path("image") or r.modalities.get("image")),
                     key=lambda r: r.id)
    if errors:
        print(f"vlm data: {len(errors)} bad entr{'y' if len(errors) == 1 else 'ies'} in {cfg.path} "
              f"skipped (first: {errors[0].id}: {errors[0].reason})")
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise VLMDataError(f"{cfg.path}: no image-caption records ({cfg.source})")
    return records


def image_paths(rec: Record) -> list[str]:
    """One image (`path`) or several (`paths`, in placeholder order)."""
    m = rec.modalities.get("image") or {}
    paths = m.get("paths") or ([m["path"]] if m.get("path") else [])
    return [str(p) for p in paths]


def bucket_of(label_len: int, edges: Sequence[int]) -> int:
    return int(sum(label_len >= e for e in edges))


class SequenceBuilder:
    """Record -> VLMSample (ids + labels) for a text adapter and the VLM's extra token ids."""

    def __init__(self, text: Any, tokens: Any, n_visual: int, cfg: VLMDataConfig):
        self.text, self.tokens, self.n_visual, self.cfg = text, tokens, n_visual, cfg

    def prompt_ids(self, prompt: str, n_images: int, sample_id: str) -> list[int]:
        pieces = self.cfg.prompt_template.format(prompt=prompt).split(IMAGE_TOKEN)
        if len(pieces) - 1 != n_images:
            raise VLMDataError(f"sample {sample_id}: {len(pieces) - 1} {IMAGE_TOKEN} placeholder(s) "
                               f"but {n_images} image(s)")
        span = [self.tokens.im_start] + [self.tokens.image_pad] * self.n_visual + [self.tokens.im_end]
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k:
                ids += span
            ids += self.text.encode(piece) if piece else []
        return ids

    def build(self, rec: Record) -> VLMSample:
        paths = image_paths(rec)
        prompt = self.prompt_ids(str(rec.text.get("prompt", "")), len(paths), rec.id)
        caption = str(rec.text.get("caption", "")).strip()
        target = self.text.encode(self.cfg.caption_prefix + caption) + [self.tokens.eos]
        ids, labels = prompt + target, [-100] * len(prompt) + target
        truncated = len(ids) > self.cfg.max_seq_len
        if truncated:
            keep = max(self.cfg.max_seq_len, len(prompt))  # never cut the prompt / image span
            ids, labels = ids[:keep], labels[:keep]
        label_len = sum(lab != -100 for lab in labels)
        return VLMSample(id=rec.id, group=rec.group, caption=caption, image_paths=paths, input_ids=ids,
                         labels=labels, truncated=truncated, label_len=label_len,
                         meta={"prompt": str(rec.text.get("prompt", ""))})

    def text_in_span(self, s: VLMSample) -> tuple[list[int], list[int]]:
        """The sample's sequence with its caption's first N ids written into the image span (pad
        after) and labels on everything outside the span: the tiny LLM's text warm-up teaches it
        to read content from the image-span positions, as a pretrained LLM reads context."""
        cap = self.text.encode(self.cfg.caption_prefix + s.caption)[: self.n_visual]
        fill = cap + [self.tokens.pad] * (self.n_visual - len(cap))
        ids, labels, k = list(s.input_ids), [], 0
        for i in ids:
            labels.append(-100 if i == self.tokens.image_pad else i)
        for j, i in enumerate(ids):
            if i == self.tokens.image_pad:
                ids[j] = fill[k % self.n_visual]
                k += 1
        return ids, labels


def length_stats(samples: Sequence[VLMSample]) -> dict:
    """Truncation %, zero-label %, average label tokens (the stage-1 runbook's check 2)."""
    n = max(len(samples), 1)
    return {"n": len(samples),
            "truncated_pct": 100.0 * sum(s.truncated for s in samples) / n,
            "zero_label_pct": 100.0 * sum(s.label_len == 0 for s in samples) / n,
            "avg_label_tokens": sum(s.label_len for s in samples) / n,
            "max_seq_len_seen": max((len(s.input_ids) for s in samples), default=0)}


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

def load_image(path: str | Path, size: int) -> torch.Tensor:
    """RGB, shorter side resized to `size` (bicubic), center crop, normalised: float32 [3, size, size].
    `path` may be an object-store URI (s3://, gs://), fetched as codecs.base.media_file does."""
    from PIL import Image, UnidentifiedImageError

    from ..codecs.base import media_file

    with media_file(str(path)) as local:
        try:
            with Image.open(local) as im:
                im = im.convert("RGB")
                w, h = im.size
                if min(w, h) < 1:
                    raise MediaError(local, "empty image")
                s = size / min(w, h)
                nw, nh = max(size, round(w * s)), max(size, round(h * s))
                im = im.resize((nw, nh), Image.BICUBIC)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except FileNotFoundError:
            raise MediaError(local, "image file not found") from None
        except (UnidentifiedImageError, OSError) as e:
            raise MediaError(local, f"cannot decode image ({e})") from None
    return (torch.from_numpy(arr).permute(2, 0, 1) - MEAN) / STD


class ImageStore:
    """Images by path for one batch or one bounded set (an ablation's n samples): `keep` memoizes
    them for reuse within it; keep=False decodes on every get (nothing grows with the dataset)."""

    def __init__(self, size: int, keep: bool = True):
        self.size, self.keep = size, keep
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, path: str) -> torch.Tensor:
        t = self._cache.get(path)
        if t is None:
            t = load_image(path, self.size)
            if self.keep:
                self._cache[path] = t
        return t


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------

def collate(samples: Sequence[VLMSample], images: ImageStore, pad_id: int, left_pad: bool = False,
            prompt_only: bool = False, override_images: Optional[list[list[str]]] = None) -> dict:
    """Pad to the longest sequence. Left padding (and `prompt_only`) is for generation."""
    seqs = [(s.input_ids[: s.prompt_len], [-100] * s.prompt_len) if prompt_only else (s.input_ids, s.labels)
            for s in samples]
    t = max(len(ids) for ids, _ in seqs)
    ids_t = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    lab_t = torch.full((len(seqs), t), -100, dtype=torch.long)
    am = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (ids, labels) in enumerate(seqs):
        sl = slice(t - len(ids), t) if left_pad else slice(0, len(ids))
        ids_t[i, sl] = torch.tensor(ids)
        lab_t[i, sl] = torch.tensor(labels)
        am[i, sl] = 1
    paths = override_images or [s.image_paths for s in samples]
    pix = []
    for s, ps in zip(samples, paths):
        for p in ps:
            try:
                pix.append(images.get(p))
            except MediaError as e:
                raise VLMDataError(f"sample {s.id}: {e}") from None
    return {"input_ids": ids_t, "labels": lab_t, "attention_mask": am,
            "pixel_values": torch.stack(pix) if pix else torch.zeros(0, 3, images.size, images.size),
            "image_counts": [len(ps) for ps in paths], "ids": [s.id for s in samples]}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class StepSampler:
    """Global-batch positions: step -> this rank's micro-batches of sample indices."""

    def __init__(self, n: int, global_batch: int, world: int, accum: int, seed: int):
        if global_batch % (world * accum):
            raise VLMDataError(f"global_batch {global_batch} is not divisible by workers x grad_accum "
                               f"= {world} x {accum}")
        if n < global_batch:
            raise VLMDataError(f"{n} training samples < global_batch {global_batch}")
        self.n, self.b, self.world, self.accum, self.seed = n, global_batch, world, accum, seed
        self.per_micro = global_batch // (world * accum)
        self.steps_per_epoch = n // global_batch  # drop the ragged tail: equal batches on every rank
        self._perm: tuple[int, np.ndarray] = (-1, np.empty(0))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1][k * self.b:(k + 1) * self.b]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        mine = self.global_indices(step)[rank * self.accum * self.per_micro:(rank + 1) * self.accum * self.per_micro]
        return [mine[m * self.per_micro:(m + 1) * self.per_micro] for m in range(self.accum)]


# ------------------------------------------------------------------------------------------------
# Stratified eval split + golden set
# ------------------------------------------------------------------------------------------------

def stratified_split(samples: Sequence[VLMSample], edges: Sequence[int], eval_size: int, seed: int) -> dict:
    """Pick eval groups per caption-length bucket in proportion to the bucket sizes (largest
    remainder), seeded; sets `bucket` on every sample. Eval is at most half the groups."""
    for s in samples:
        s.bucket = bucket_of(s.label_len, edges)
    groups: dict[str, list[VLMSample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    by_bucket: dict[int, list[str]] = {}
    for g in sorted(groups):
        by_bucket.setdefault(groups[g][0].bucket, []).append(g)
    want = min(eval_size, len(groups) // 2)
    total = len(groups)
    quota = {b: want * len(gs) / total for b, gs in by_bucket.items()}
    take = {b: int(q) for b, q in quota.items()}
    for b in sorted(quota, key=lambda b: (-(quota[b] - take[b]), b))[: want - sum(take.values())]:
        take[b] += 1
    rng = np.random.default_rng([seed, 7])
    eval_groups: set[str] = set()
    for b in sorted(by_bucket):
        gs = by_bucket[b]
        eval_groups.update(gs[i] for i in rng.permutation(len(gs))[: take[b]])
    ev = [s for s in samples if s.group in eval_groups]
    tr = [s for s in samples if s.group not in eval_groups]
    counts = {str(b): {"train": sum(s.bucket == b for s in tr), "eval": sum(s.bucket == b for s in ev)}
              for b in range(len(edges) + 1)}
    return {"edges": list(edges), "seed": seed, "bucket_counts": counts,
            "eval": [{"id": s.id, "bucket": s.bucket, "label_len": s.label_len} for s in ev],
            "train": [{"id": s.id, "bucket": s.bucket, "label_len": s.label_len} for s in tr]}


def golden_ids(split: dict, size: int, seed: int) -> list[str]:
    ids = sorted(e["id"] for e in split["eval"])
    pick = np.random.default_rng([seed, 11]).permutation(len(ids))[: size]
    return [ids[i] for i in sorted(pick)]


def save_split(split: dict, golden: list[str], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_file(p, json.dumps({**split, "golden": golden}, indent=1, sort_keys=True) + "\n")
    return p


@dataclass
class VLMData:
    train: list[VLMSample]
    eval: list[VLMSample]
    golden: list[VLMSample]
    images: ImageStore
    split: dict
    stats: dict


def prepare_data(cfg: VLMDataConfig, text: Any, tokens: Any, n_visual: int, image_size: int,
                 split_path: Optional[str | Path] = None) -> VLMData:
    """Records -> samples -> split (reused from `split_path` when it exists, else written there): the
    driver's plan (trainers/vlm.py prepare_run writes it as data/*.arrow for the ranks). Images are
    decoded when a batch is collated, never all up front."""
    builder = SequenceBuilder(text, tokens, n_visual, cfg)
    samples = [builder.build(r) for r in load_records(cfg)]
    sp = Path(split_path) if split_path else None
    if sp and sp.exists():
        split = json.loads(sp.read_text())
        for s in samples:
            s.bucket = bucket_of(s.label_len, split["edges"])
        golden = split.get("golden", [])
    else:
        split = stratified_split(samples, cfg.bucket_edges, cfg.eval_size, cfg.seed)
        golden = golden_ids(split, cfg.golden_size, cfg.seed)
        if sp:
            save_split(split, golden, sp)
    eval_ids = {e["id"] for e in split["eval"]}
    train = [s for s in samples if s.id not in eval_ids]
    ev = [s for s in samples if s.id in eval_ids]
    by_id = {s.id: s for s in ev}
    return VLMData(train=train, eval=ev, golden=[by_id[i] for i in golden if i in by_id],
                   images=ImageStore(image_size, keep=False),
                   split=split, stats={"train": length_stats(train), "eval": length_stats(ev)})
