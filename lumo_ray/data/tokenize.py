"""Turn manifest records into shard samples (library, no Ray).

Two halves so a pipeline can put them on different workers: `load` (CPU: decode, resample,
resize; one record at a time) and `tokenize` (model: one batched encode per modality). A bad
sample comes back as an error entry naming the stage and reason; it never stops the batch.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..codecs.base import MediaError, media_file
from ..config import UTIConfig, to_dict
from ..token_space import TokenSpace
from ..runtime import torch_threads
from ..uti import build_adapters, build_token_space
from .manifest import TASK_MEDIA, Record
from .shard_plan import digest_add, digest_start
from .shards import encode_sample, token_dtype

IMAGE_PLACEHOLDER = "<image>"


def plan_shards(records: list[Record], shard_size: int) -> dict[tuple[str, int], list[Record]]:
    """(split, shard index) -> records, assigned by manifest order within each split."""
    plan: dict[tuple[str, int], list[Record]] = {}
    by_split: dict[str, list[Record]] = {}
    for r in sorted(records, key=lambda r: r.id):
        by_split.setdefault(r.split or "train", []).append(r)
    for split, recs in sorted(by_split.items()):
        for i in range(0, len(recs), shard_size):
            plan[(split, i // shard_size)] = recs[i: i + shard_size]
    return plan


def shard_input_digest(records: list[Record], config_digest: str) -> str:
    """What a finished shard was made from: its records and the tokenize config (incl. token space)."""
    h = digest_start(config_digest)
    for r in records:
        digest_add(h, r)
    return h.hexdigest()


def plan_units(recs: list, batch_size: int) -> list[list]:
    """A shard's model batches (of records, or of their loaded media), cut in manifest order: the same
    whatever runs them."""
    return [recs[i: i + batch_size] for i in range(0, len(recs), batch_size)]


class StageClock:
    """Seconds per named stage, summed over calls, as [wall clock, CPU]: the per-stage table of a
    tokenize run. Two clock reads a stage. `take()` hands the sums over and starts again; `lap(stage)`
    books the time since the last `mark()` / `lap()`. cpu: this process's CPU clock, or
    time.thread_time where several calls run at once in one process (each would count the others')."""

    def __init__(self, cpu=time.process_time):
        self.s: dict[str, list[float]] = {}
        self.cpu = cpu
        self.mark()

    def read(self) -> tuple[float, float]:
        return time.perf_counter(), self.cpu()

    @contextmanager
    def __call__(self, stage: str):
        w, c = self.read()
        try:
            yield
        finally:
            w1, c1 = self.read()
            self.add({stage: (w1 - w, c1 - c)})

    def mark(self) -> None:
        self._mark = self.read()

    def lap(self, stage: str) -> None:
        w, c = self.read()
        self.add({stage: (w - self._mark[0], c - self._mark[1])})
        self._mark = (w, c)

    def add(self, seconds: dict) -> None:
        """Add {stage: (wall, cpu)} (another clock's `take()`)."""
        for k, (w, c) in seconds.items():
            cur = self.s.setdefault(k, [0.0, 0.0])
            cur[0] += w
            cur[1] += c

    def take(self) -> dict[str, list[float]]:
        s, self.s = self.s, {}
        return s


class TextTooLong(ValueError):
    """A sample's caption + prompt tokens exceed the bound (it could never fit a training sequence)."""


class SampleTokenizer:
    """Adapters + token space, built once per worker. max_text_tokens: caption + prompt tokens above
    it make the sample a 'text too long' error, never a shard member (0: no bound). built: `built()`
    of a SampleTokenizer with the same config in another process (the driver): its token space and
    random presets' weights are taken, not built again."""

    def __init__(self, cfg: UTIConfig, max_text_tokens: int = 0, built: dict | None = None):
        self.cfg, self.max_text_tokens = cfg, max_text_tokens
        self.adapters = build_adapters(cfg)
        self._ts: TokenSpace | None = None
        # a fast (Rust) text tokenizer raises 'Already borrowed' when two threads encode at once; the
        # model batches, where the time goes, need no lock (data.tokenize.calls_per_actor)
        self._text_lock = threading.Lock()
        if built is not None:
            for m, weights in built["weights"].items():
                getattr(self.adapters, m).use_weights(weights)
            self._ts = TokenSpace.from_json(built["token_space"])

    def built(self) -> dict:
        """What another process with this config needs to skip the model builds (a random preset's
        identity is a digest of its weights, and the full-size ones take seconds to draw): the token
        space and each random preset's weights as numpy arrays (plain data for Ray's object store)."""
        weights = {}
        for m in ("audio", "image"):
            w = getattr(getattr(self.adapters, m), "built_weights", lambda: None)()
            if w is not None:
                weights[m] = w
        return {"token_space": self.ts.to_json(), "weights": weights}

    def build_models(self) -> None:
        """Build (or assign) the EnCodec / VQ models and the token space now, not on the first batch."""
        self.ts
        for m in ("audio", "image"):
            a = getattr(self.adapters, m)
            if hasattr(a, "built_weights"):
                a.model

    @property
    def ts(self) -> TokenSpace:
        """Built on first use: a random preset's identity is its weights, so the token space builds the
        models, which a loader (`load` only) never needs."""
        if self._ts is None:
            self._ts = build_token_space(self.cfg, self.adapters)
        return self._ts

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.ts.total)

    # -- CPU half ---------------------------------------------------------------------------
    def load(self, rec: dict) -> dict:
        """{'rec', 'audio'?, 'image'?} or {'rec', 'error': {stage, reason, detail}}."""
        r = Record.from_dict(rec)
        out: dict[str, Any] = {"rec": rec}
        try:
            if not (r.text.get("caption") or "").strip():
                raise MediaError(r.id, "empty caption")
            for m in TASK_MEDIA[r.task]:
                path = r.media_path(m)
                if path is None:
                    raise MediaError(r.id, f"task {r.task} needs {m} but the record has none")
                adapter = getattr(self.adapters, m)
                if adapter is None:
                    raise MediaError(r.id, f"the token space has no {m} tokenizer")
                with media_file(path) as local:
                    out[m] = adapter.load(local)
        except MediaError as e:
            out["error"] = {"stage": "load", "reason": e.reason, "detail": str(e)}
        except Exception as e:  # an unexpected decoder failure is still this sample's error
            out["error"] = {"stage": "load", "reason": type(e).__name__, "detail": str(e)}
        return out

    # -- model half -------------------------------------------------------------------------
    def tokenize_shard(self, loaded: list[dict], batch_size: int) -> list[dict]:
        """A shard's loaded records, encoded in its model batches (plan_units)."""
        return [r for unit in plan_units(loaded, batch_size) for r in self.tokenize(unit)]

    def tokenize(self, items: list[dict]) -> list[dict]:
        """One batched encode per modality; returns {'id', 'members'} or {'id', 'error'} per item."""
        with torch_threads(self.cfg.runtime.threads):
            return self._tokenize(items)

    def _tokenize(self, items: list[dict]) -> list[dict]:
        ok = [it for it in items if "error" not in it]
        audio_idx = [i for i, it in enumerate(ok) if "audio" in it]
        image_idx = [i for i, it in enumerate(ok) if "image" in it]
        codes: dict[tuple[str, int], Any] = {}
        if audio_idx:
            enc = self.adapters.audio.encode_batch([ok[i]["audio"] for i in audio_idx])
            codes.update({("audio", i): c for i, c in zip(audio_idx, enc)})
        if image_idx:
            enc = self.adapters.image.encode_batch([ok[i]["image"] for i in image_idx])
            codes.update({("image", i): c for i, c in zip(image_idx, enc)})
        results = {}
        for i, it in enumerate(ok):
            rec = it["rec"]
            try:
                with self._text_lock:
                    members = self._sample(it, codes.get(("audio", i)), codes.get(("image", i)))
                results[rec["id"]] = {"id": rec["id"], "members": members}
            except Exception as e:
                reason = "text too long" if isinstance(e, TextTooLong) else type(e).__name__
                results[rec["id"]] = {"id": rec["id"], "error": {"stage": "tokenize", "reason": reason,
                                                                 "detail": str(e)}}
        return [results.get(it["rec"]["id"]) or {"id": it["rec"]["id"], "error": it["error"]} for it in items]

    def _sample(self, it: dict, audio_codes, image_codes) -> dict[str, bytes]:
        rec = it["rec"]
        text = self.adapters.text
        prompt = (rec["text"].get("prompt") or "").replace(IMAGE_PLACEHOLDER, "").strip()
        arrays = {"text": np.asarray(text.encode(rec["text"]["caption"].strip()), np.int64)}
        if prompt:
            arrays["prompt"] = np.asarray(text.encode(prompt), np.int64)
        n_text = sum(arrays[k].size for k in ("text", "prompt") if k in arrays)
        if self.max_text_tokens and n_text > self.max_text_tokens:
            raise TextTooLong(f"{rec['id']}: caption + prompt are {n_text} tokens > data.tokenize.max_text_tokens "
                              f"{self.max_text_tokens} (0 means token_lm.seq.max_len)")
        pre: dict[str, Any] = {}
        side: dict[str, Any] = {}
        if audio_codes is not None:
            arrays["audio"] = self.ts.audio_to_global(audio_codes.codes)
            pre["audio"] = it["audio"].record
            side["audio"] = audio_codes.side_info
        if image_codes is not None:
            arrays["image"] = self.ts.image_to_global(image_codes)
            pre["image"] = it["image"].record
        meta = {"id": rec["id"], "task": rec["task"], "split": rec.get("split") or "train",
                "source": rec["source"], "group": rec["group"],
                "lengths": {k: int(v.size) for k, v in arrays.items()},
                "preprocess": pre, "side_info": side, "token_space_hash": self.ts.hash}
        return encode_sample(rec["id"], arrays, meta, self.dtype)


def text_token_bound(cfg) -> int:
    """The caption + prompt token bound of tokenize (a LumoConfig): data.tokenize.max_text_tokens, else
    the token LM's max_len."""
    return cfg.data.tokenize.max_text_tokens or cfg.token_lm.seq.max_len


def tokenize_config_digest(cfg: UTIConfig, shard_size: int, ts_hash: str, batch_size: int,
                           max_text_tokens: int = 0) -> str:
    """Digest of the settings that decide shard bytes: a finished shard made with other ones is redone.
    The batch size is one: batched encodes are not bitwise batch-invariant (padding, kernels), so a
    model batch is the unit of determinism. Not included: actors (tested not to matter) and the
    device / thread count, which can move low-order floats: resume on the same kind of machine.
    The text token bound is one: it decides which samples a shard holds."""
    ident = {"token_space": ts_hash, "shard_size": shard_size, "batch_size": batch_size,
             "max_text_tokens": max_text_tokens,
             "audio": {k: v for k, v in to_dict(cfg.audio).items() if k in ("max_seconds", "channel_policy", "min_seconds")},
             "image": {"resolution": cfg.image.resolution}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
