"""The stage-1 VLM's samples on disk and its one micro-batch decode function: what a training rank
reads instead of holding the dataset.

- The driver (trainers/vlm.py prepare_run) writes `<run>/data/train.arrow` and `eval.arrow` (Arrow
  IPC, one row per sample: id, group, prompt, caption, image paths, bucket, label_len, in id order)
  and `plan.json` (bucket edges and counts, golden ids, length stats, row counts): what a rank needs
  of the split, without splits.json's list of every id.
- A rank memory-maps a table and takes the rows it needs: only the pages it touches are read.
- MicroBatchDecoder: (step, micro) -> a ready micro-batch (rows of StepSampler's slice, tokenized,
  images decoded + resized, padded). Ray Data actors run it (trainers/vlm_stream.py), or, without
  Ray, `prefetch` runs it in a thread of this process: one decode function, two executors.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..config.vlm import VLMDataConfig
from ..storage import safe_writer, write_file
from .manifest import Record
from .vlm_data import (ImageStore, SequenceBuilder, StepSampler, VLMData, VLMDataError, VLMSample, collate,
                       load_records, prepare_data)

COLUMNS = ("id", "group", "prompt", "caption", "image_paths", "bucket", "label_len")
BATCH_ROWS = 4096  # rows per Arrow record batch: a take() touches only the batches it needs


def data_dir(run: str | Path) -> Path:
    return Path(run) / "data"


def write_table(samples: Sequence[VLMSample], path: str | Path) -> Path:
    """The samples' text and image paths (not their token ids: ranks tokenize what they read)."""
    import pyarrow as pa

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [s.id for s in samples], "group": [s.group for s in samples],
                      "prompt": [s.meta.get("prompt", "") for s in samples],
                      "caption": [s.caption for s in samples],
                      "image_paths": pa.array([s.image_paths for s in samples], type=pa.list_(pa.string())),
                      "bucket": pa.array([s.bucket for s in samples], type=pa.int32()),
                      "label_len": pa.array([s.label_len for s in samples], type=pa.int32())})
    with safe_writer(p) as raw, pa.PythonFile(raw, mode="w") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=BATCH_ROWS)
    return p


def write_tables(data: VLMData, run: str | Path) -> Path:
    """train.arrow, eval.arrow and plan.json under <run>/data (the driver, once per run)."""
    d = data_dir(run)
    write_table(data.train, d / "train.arrow")
    write_table(data.eval, d / "eval.arrow")
    plan = {"edges": data.split["edges"], "bucket_counts": data.split["bucket_counts"],
            "golden": [s.id for s in data.golden], "stats": data.stats,
            "rows": {"train": len(data.train), "eval": len(data.eval)}}
    write_file(d / "plan.json", json.dumps(plan, indent=1, sort_keys=True) + "\n")
    return d


def read_plan(run: str | Path) -> dict:
    p = data_dir(run) / "plan.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: the driver writes the VLM's data plan before training (prepare_run)")
    return json.loads(p.read_text())


class RecordTable:
    """A memory-mapped train.arrow / eval.arrow: rows by position, as Records or samples."""

    def __init__(self, path: str | Path):
        import pyarrow as pa

        self.path = str(path)
        try:
            self.table = pa.ipc.open_file(pa.memory_map(self.path)).read_all()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no VLM sample table (written by prepare_run)") from None

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, idx: Iterable[int]) -> list[dict]:
        return self.table.take(np.asarray(list(idx), dtype=np.int64)).to_pylist()

    def samples(self, idx: Iterable[int], builder: SequenceBuilder) -> list[VLMSample]:
        """Tokenized samples (no images) of these rows, in order."""
        out = []
        for r in self.rows(idx):
            rec = Record(id=r["id"], source="", group=r["group"], task="i2t",
                         modalities={"image": {"paths": list(r["image_paths"])}},
                         text={"prompt": r["prompt"], "caption": r["caption"]})
            s = builder.build(rec)
            s.bucket = int(r["bucket"])
            out.append(s)
        return out


@dataclass
class StreamSpec:
    """What a decoder needs to rebuild one rank's micro-batches (picklable: shipped to Ray actors)."""
    table: str
    """train.arrow on the decoder's node (the rank's own copy of the run directory)."""
    data: VLMDataConfig
    tokenizer: str
    """Text tokenizer name (llm.tokenizer): each decoder builds it once."""
    tokens: Any
    """The VLM's extra token ids (models.vlm.VLMTokens)."""
    n_visual: int
    image_size: int
    global_batch: int
    world: int
    accum: int
    seed: int
    rank: int


class MicroBatchDecoder:
    """(step, micro) -> this rank's micro-batch, as trainers/vlm.py feeds it to the model: the
    collate() dict plus "step" and "micro". Builds the tokenizer and opens the table once."""

    def __init__(self, spec: StreamSpec):
        from ..codecs.text import build_text_adapter
        from ..config import TextConfig

        self.spec = spec
        self.table = RecordTable(spec.table)
        self.builder = SequenceBuilder(build_text_adapter(TextConfig(tokenizer=spec.tokenizer)), spec.tokens,
                                       spec.n_visual, spec.data)
        self.sampler = StepSampler(len(self.table), spec.global_batch, spec.world, spec.accum, spec.seed)

    def decode(self, step: int, micro: int) -> dict:
        idx = self.sampler.micro_batches(step, self.spec.rank)[micro]
        samples = self.table.samples(idx.tolist(), self.builder)
        batch = collate(samples, ImageStore(self.spec.image_size, keep=False), self.spec.tokens.pad)
        return {**batch, "step": int(step), "micro": int(micro)}

    def __call__(self, batch: dict) -> dict:
        """Ray Data map_batches: rows {step, micro} -> rows {step, micro, batch: the pickled dict}
        (a pickle keeps each micro-batch's own shapes; Arrow tensor columns want one per block)."""
        import pickle

        out = [self.decode(int(s), int(m)) for s, m in zip(batch["step"], batch["micro"])]
        return {"step": np.array([b["step"] for b in out]), "micro": np.array([b["micro"] for b in out]),
                "batch": np.array([pickle.dumps(b, protocol=5) for b in out], dtype=object)}


def stream_rows(start: int, stop: int, accum: int) -> list[dict]:
    """The stream of a rank that resumes at `start`: one row per micro-batch, in training order."""
    return [{"step": s, "micro": m} for s in range(start, stop) for m in range(accum)]


def prefetch(decoder: MicroBatchDecoder, rows: Sequence[dict], ahead: int) -> Iterator[dict]:
    """Without Ray: decode in one thread of this process, `ahead` micro-batches before the step."""
    with ThreadPoolExecutor(1, thread_name_prefix="vlm-decode") as pool:
        pending = [pool.submit(decoder.decode, r["step"], r["micro"]) for r in rows[: max(ahead, 1)]]
        nxt = len(pending)
        while pending:
            out = pending.pop(0).result()
            if nxt < len(rows):
                pending.append(pool.submit(decoder.decode, rows[nxt]["step"], rows[nxt]["micro"]))
                nxt += 1
            yield out


def load_eval(cfg: VLMDataConfig, builder: SequenceBuilder, split_path: Optional[str | Path],
              image_size: int, tables: bool = True) -> tuple[list[VLMSample], dict]:
    """The eval samples (tokenized; images are decoded when used) and the split: from the run's
    data/eval.arrow beside split_path when there (and `tables`), else from the raw records the split
    names (a run directory written before the tables, or another data path); no split: planned afresh."""
    sp = Path(split_path) if split_path else None
    if sp is None or not sp.exists():
        data = prepare_data(cfg, builder.text, builder.tokens, builder.n_visual, image_size, sp)
        return data.eval, data.split
    split = json.loads(sp.read_text())
    table = data_dir(sp.parent) / "eval.arrow"
    if tables and table.exists():
        t = RecordTable(table)
        return t.samples(range(len(t)), builder), split
    want = {e["id"]: e["bucket"] for e in split["eval"]}
    samples = [builder.build(r) for r in load_records(cfg) if r.id in want]
    for s in samples:
        s.bucket = want[s.id]
    if not samples:
        raise VLMDataError(f"{cfg.path}: none of the {len(want)} eval ids of {sp} are in the data")
    return samples, split

