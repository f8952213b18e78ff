"""Sequence builder of the token LM (docs/stage3_token_lm.md): shard sample -> (input ids, labels) per task layout.

Layouts ('full' delimiters; 'compact' drops the generation token and, for x2t, <|text_start|>):
  i2t  [instr] <|img_start|> IMG <|img_end|> <|gen_text|> <|text_start|> CAPTION <|text_end|>
  a2t  [instr] <|aud_start|> AUD <|aud_end|> <|gen_text|> <|text_start|> CAPTION <|text_end|>
  t2i  [instr] <|text_start|> CAPTION <|text_end|> <|gen_img|> <|img_start|> IMG <|img_end|>
  t2a  [instr] <|text_start|> CAPTION <|text_end|> <|gen_aud|> <|aud_start|> AUD <|aud_end|>
  t    <|text_start|> TEXT <|text_end|>
Loss only on the target span (the part after the input, including its closing token). In training a
t2x caption may be dropped (cfg.caption_dropout: the unconditional form, no caption tokens between the
same delimiters, for classifier-free guidance; `build(..., drop_caption=True)` is that form). Audio is
cropped on frame boundaries, so position p keeps codebook p mod K: an input span at random in
training and centred in eval, a target span (t2a) always centred (a caption cannot predict a
random window). Boundary tokens come from the token space, never from the text tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..config.lm import SequenceConfig
from ..token_space import TokenSpace, TokenSpaceError

IGNORE = -100
MEDIA = {"i2t": "image", "t2i": "image", "a2t": "audio", "t2a": "audio"}
REVERSE = {"i2t": "t2i", "a2t": "t2a", "t2i": "i2t", "t2a": "a2t"}
DELIM = {"image": ("<|img_start|>", "<|img_end|>", "<|gen_img|>"),
         "audio": ("<|aud_start|>", "<|aud_end|>", "<|gen_aud|>")}


class SequenceError(ValueError):
    """A sample that cannot become a sequence: the message names the sample and the reason."""


@dataclass
class Sequence:
    input_ids: np.ndarray
    labels: np.ndarray
    task: str
    id: str
    media_span: Optional[tuple[int, int]] = None
    """[start, stop) of the media ids (without delimiters), for ablations."""
    extra: dict = field(default_factory=dict)


def crop_audio(ids: np.ndarray, k: int, max_tokens: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Crop an interleaved stream to at most max_tokens on frame boundaries (K ids per frame).
    rng=None: centred crop (eval); else a random frame offset (training)."""
    frames = ids.size // k
    keep = max(1, max_tokens // k)
    if frames <= keep:
        return ids
    start = (frames - keep) // 2 if rng is None else int(rng.integers(0, frames - keep + 1))
    return ids[start * k:(start + keep) * k]


class SequenceBuilder:
    """Builds sequences for one token space and sequence config.

    encode: the text tokenizer's encode (needed only for instruction templates)."""

    def __init__(self, ts: TokenSpace, cfg: SequenceConfig, encode: Optional[Callable[[str], list[int]]] = None):
        self.ts, self.cfg = ts, cfg
        if not 0.0 <= cfg.caption_dropout <= 1.0:
            raise ValueError(f"token_lm.seq.caption_dropout must be in [0, 1], got {cfg.caption_dropout}")
        self.sp = {n: ts.special_id(n) for n in ts.specials}
        self.pad_id = self.sp.get("<|pad_mm|>", 0)
        self.templates: dict[str, list[np.ndarray]] = {}
        if cfg.instruction in ("fixed", "templates"):
            if encode is None:
                raise ValueError(f"instruction={cfg.instruction!r} needs the text tokenizer's encode")
            self.templates = {t: [np.asarray(encode(s), np.int64) for s in v] for t, v in cfg.templates.items() if v}

    def batch(self, seqs: list[Sequence]) -> dict:
        """The model batch of these sequences: packed rows when cfg.pack, else right-padded."""
        if self.cfg.pack:
            return pack(seqs, self.pad_id, self.cfg.pack_len)
        return collate(seqs, self.pad_id)

    def _instruction(self, task: str, sample: dict, rng: Optional[np.random.Generator]) -> np.ndarray:
        mode = self.cfg.instruction
        if mode == "data":
            return np.asarray(sample.get("prompt", np.zeros(0, np.int64)), np.int64)
        if mode == "none" or task not in self.templates:
            return np.zeros(0, np.int64)
        opts = self.templates[task]
        if mode == "fixed" or rng is None:
            return opts[0]
        return opts[int(rng.integers(0, len(opts)))]

    def media(self, sample: dict, modality: str, rng: Optional[np.random.Generator]) -> np.ndarray:
        sid = sample["json"].get("id", "?")
        if modality not in sample:
            raise SequenceError(f"sample {sid}: task needs {modality} tokens but the sample has none")
        ids = np.asarray(sample[modality], np.int64)
        if modality == "audio":
            k = self.ts.num_codebooks
            if ids.size % k or self.ts.audio_phase_errors(ids):
                raise SequenceError(f"sample {sid}: audio stream breaks codebook phase (length {ids.size}, K={k})")
            ids = crop_audio(ids, k, self.cfg.max_audio_tokens, rng)
        return ids

    def tasks_of(self, sample: dict) -> list[str]:
        """The layouts a sample is evaluated in: its own, plus the reverse under 'both' / 'any'."""
        task = sample["json"]["task"]
        return [task, REVERSE[task]] if self.cfg.layouts in ("both", "any") and task in REVERSE else [task]

    def task_of(self, sample: dict, rng: Optional[np.random.Generator]) -> str:
        task = sample["json"]["task"]
        if self.cfg.layouts == "both" and rng is not None and task in REVERSE and rng.random() < self.cfg.reverse_prob:
            return REVERSE[task]
        return task

    def build(self, sample: dict, task: Optional[str] = None, rng: Optional[np.random.Generator] = None,
              media_override: Optional[np.ndarray] = None, drop_caption: bool = False) -> Sequence:
        """rng=None means eval (centred crop, first template, no dropout). media_override replaces the
        media ids as given (ablations). drop_caption: a t2x sequence in its unconditional form (what
        caption dropout trains; the unconditional prompt of classifier-free guidance); extra['caption_dropped']
        says whether the caption was dropped."""
        task = task or self.task_of(sample, rng)
        sid = str(sample["json"].get("id", "?"))
        sp, compact = self.sp, self.cfg.delimiters == "compact"
        text = np.asarray(sample["text"], np.int64)
        if text.size == 0:
            raise SequenceError(f"sample {sid}: empty caption")
        instr = self._instruction(task, sample, rng)
        if task == "t":
            parts = [(np.array([sp["<|text_start|>"]]), False), (text, True), (np.array([sp["<|text_end|>"]]), True)]
            return self._join(parts, task, sid, None)
        if task not in MEDIA:
            raise SequenceError(f"sample {sid}: unknown task {task!r}")
        modality = MEDIA[task]
        start, end, gen = (sp[n] for n in DELIM[modality])
        # a target span is never a random window: the caption must be able to predict it
        media_rng = rng if task in ("i2t", "a2t") else None
        media = self.media(sample, modality, media_rng) if media_override is None else np.asarray(media_override, np.int64)
        if task in ("i2t", "a2t"):
            if rng is not None and self.cfg.modality_dropout > 0 and rng.random() < self.cfg.modality_dropout:
                media = media[:0]
            head = [] if compact else [sp["<|gen_text|>"], sp["<|text_start|>"]]
            parts = [(instr, False), (np.array([start]), False), (media, False), (np.array([end] + head), False),
                     (text, True), (np.array([sp["<|text_end|>"]]), True)]
            return self._join(parts, task, sid, 2)
        p = self.cfg.caption_dropout  # drawn only when on: with 0 the generator's stream is as before
        dropped = drop_caption or (rng is not None and p > 0 and rng.random() < p)
        if dropped:
            text = text[:0]
        head = [sp["<|text_start|>"]]
        tail = [sp["<|text_end|>"]] + ([] if compact else [gen]) + [start]
        parts = [(instr, False), (np.array(head), False), (text, False), (np.array(tail), False),
                 (media, True), (np.array([end]), True)]
        seq = self._join(parts, task, sid, 4)
        seq.extra["caption_dropped"] = bool(dropped)
        return seq

    def _join(self, parts: list[tuple[np.ndarray, bool]], task: str, sid: str, media_part: Optional[int]) -> Sequence:
        ids = np.concatenate([np.asarray(p, np.int64) for p, _ in parts])
        labels = np.concatenate([np.asarray(p, np.int64) if tgt else np.full(len(p), IGNORE, np.int64)
                                 for p, tgt in parts])
        if ids.size > self.cfg.max_len:
            raise SequenceError(f"sample {sid}: {task} sequence of {ids.size} tokens exceeds max_len {self.cfg.max_len}")
        span = None
        if media_part is not None:
            a = sum(len(p) for p, _ in parts[:media_part])
            span = (a, a + len(parts[media_part][0]))
        return Sequence(ids, labels, task, sid, span)


def noise_like(ts: TokenSpace, modality: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random in-range ids for a media span (audio keeps codebook phase)."""
    if modality == "image":
        r = ts.range("IMAGE")
        return rng.integers(r.start, r.stop, size=n)
    k = ts.num_codebooks
    starts = np.array([r.start for r in ts.audio_ranges])[np.arange(n) % k]
    sizes = np.array([r.size for r in ts.audio_ranges])[np.arange(n) % k]
    return starts + rng.integers(0, sizes)


def const_like(ts: TokenSpace, modality: str, n: int) -> np.ndarray:
    """A constant span (the first code of each codebook)."""
    if modality == "image":
        return np.full(n, ts.range("IMAGE").start, np.int64)
    return np.array([r.start for r in ts.audio_ranges], np.int64)[np.arange(n) % ts.num_codebooks]


def collate(seqs: list[Sequence], pad_id: int) -> dict:
    """Right-padded batch: input_ids, labels (IGNORE on padding), attention_mask, tasks, ids,
    sample_index (the row of each position, -1 on padding)."""
    n = max(s.input_ids.size for s in seqs)
    ids = np.full((len(seqs), n), pad_id, np.int64)
    labels = np.full((len(seqs), n), IGNORE, np.int64)
    mask = np.zeros((len(seqs), n), np.int64)
    for i, s in enumerate(seqs):
        m = s.input_ids.size
        ids[i, :m], labels[i, :m], mask[i, :m] = s.input_ids, s.labels, 1
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask), "tasks": [s.task for s in seqs], "ids": [s.id for s in seqs],
            "sample_index": torch.from_numpy(np.where(mask > 0, np.arange(len(seqs))[:, None], -1))}


def pack_rows(lengths: list[int], row_len: int = 0) -> list[list[int]]:
    """Indices into `lengths` per row: as few rows as hold every sequence within max(row_len, the
    longest) tokens, filled longest first, each into the least-filled row (the first on ties), so
    the rows come out even and the widest, the width all are padded to, stays small. Deterministic."""
    cap = max(row_len, max(lengths))
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])  # stable: ties keep their order
    r = -(-sum(lengths) // cap)
    while True:
        rows: list[list[int]] = [[] for _ in range(r)]
        fill = [0] * r
        for i in order:
            k = fill.index(min(fill))
            rows[k].append(i)
            fill[k] += lengths[i]
        if max(fill) <= cap:
            return rows
        r += 1  # terminates: with a row per sequence every row fits


def pack(seqs: list[Sequence], pad_id: int, row_len: int = 0) -> dict:
    """Packed batch: the sequences end to end in rows of at most max(row_len, the longest sequence)
    tokens (pack_rows), rows right-padded to the widest.
    input_ids, labels, position_ids (restarting at 0 per sample and for the trailing padding:
    transformers then masks attention block-diagonally, so no token sees another sample),
    sample_index (the sample of each position, -1 on padding), tasks and ids in the order of seqs."""
    rows = pack_rows([s.input_ids.size for s in seqs], row_len)
    n = max(sum(seqs[i].input_ids.size for i in r) for r in rows)
    ids = np.full((len(rows), n), pad_id, np.int64)
    labels = np.full((len(rows), n), IGNORE, np.int64)
    pos = np.zeros((len(rows), n), np.int64)
    owner = np.full((len(rows), n), -1, np.int64)
    for r, members in enumerate(rows):
        a = 0
        for i in members:
            s, m = seqs[i], seqs[i].input_ids.size
            ids[r, a:a + m], labels[r, a:a + m] = s.input_ids, s.labels
            labels[r, a] = IGNORE  # a sample's first label is no target (as unpacked): never the previous sample's
            pos[r, a:a + m], owner[r, a:a + m] = np.arange(m), i
            a += m
        pos[r, a:] = np.arange(n - a)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos), "sample_index": torch.from_numpy(owner),
            "tasks": [s.task for s in seqs], "ids": [s.id for s in seqs]}


def check_ids(ts: TokenSpace, seq: Sequence) -> None:
    """Every id is a valid token (never a padded row)."""
    bad = np.nonzero((seq.input_ids < 0) | (seq.input_ids >= ts.total))[0]
    if bad.size:
        raise TokenSpaceError(f"sample {seq.id}: id {int(seq.input_ids[bad[0]])} at {int(bad[0])} outside the token space")
