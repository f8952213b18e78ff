"""`lumo data embed`: CLIP image and caption embeddings of a manifest on Ray Data, written as Parquet
parts (lumo_ray/embed/parts.py).

The layout of tokenize (pipelines/tokenize.py): the driver plans parts in one streaming pass over the
id-sorted manifest (a part = a split + a byte range, lumo_ray/data/shard_plan.py); EmbedLoader actors
read their part's records themselves and decode / resize / normalise the images; EmbedWriter actors
hold the model, embed a part in fixed batches and write it; the driver collects the stats rows and
writes index.json last. Parts already written for the same inputs are kept (a re-run resumes).
Records without an image are counted (`no_image` in summary.json), not embedded.
"""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import ray

from lumo_ray.config import LumoConfig
from lumo_ray.config.program import EmbedConfig
from lumo_ray.data.manifest import require_manifest
from lumo_ray.data.shard_plan import ShardTask, plan_manifest, shard_records
from lumo_ray.embed import parts
from lumo_ray.resources import job_resources
from lumo_ray.runtime import Progress
from lumo_ray.storage import PathLike, locate
from pipelines.ray_env import init_ray, placement, unit_device
from pipelines.status import require_fit

MAX_BLOCKS = 512  # as tokenize: the driver keeps per-block state


def embed_config_digest(ecfg: EmbedConfig, identity: str) -> str:
    """What a part's bytes depend on besides its records: the weights, the part size, the model batch."""
    doc = {"format": parts.FORMAT, "model": identity, "shard_size": ecfg.shard_size, "batch_size": ecfg.batch_size,
           "patches": ecfg.patches}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class EmbedLoader:
    """CPU stage: a part's records from the manifest, their images decoded and preprocessed."""

    def __init__(self, cfg_blob: bytes, manifest: str, base: str | None):
        from lumo_ray.codecs.clip import image_preprocessor

        self.cfg: EmbedConfig = pickle.loads(cfg_blob)
        self.pixels = image_preprocessor(self.cfg.model, self.cfg.seed)
        self.manifest, self.base = manifest, base

    def load(self, rec) -> dict:
        from PIL import Image

        from lumo_ray.codecs.base import media_file

        path = rec.media_path("image")
        if path is None:
            return {"id": rec.id, "skip": True}
        caption = (rec.text.get("caption") or "").strip()
        try:
            with media_file(path) as local, Image.open(local) as im:
                im.load()  # decode now: a corrupt file fails here, named
                return {"id": rec.id, "source": rec.source, "pixels": self.pixels(im, path), "caption": caption}
        except Exception as e:  # this record's error, recorded; the part goes on
            return {"id": rec.id, "source": rec.source,
                    "error": {"stage": "load", "reason": type(e).__name__, "detail": f"{path}: {e}"}}

    def __call__(self, batch: dict) -> dict:
        loaded = [pickle.dumps([self.load(r) for r in shard_records(ShardTask.from_json(t), self.manifest, self.base)])
                  for t in batch["task"]]
        return {"task": batch["task"], "loaded": loaded}


class EmbedWriter:
    """Model stage: the CLIP model loaded once per actor, on the device Ray gave it; embeds a part in fixed
    batches and writes it."""

    def __init__(self, cfg_blob: bytes, out: str):
        import torch

        from lumo_ray.codecs.clip import load_clip

        self.cfg: EmbedConfig = pickle.loads(cfg_blob)
        torch.set_num_threads(self.cfg.threads)
        device, ids = unit_device()
        self.device, self.placed = str(device), placement(device, ids)
        self.clip = load_clip(self.cfg.model, self.cfg.seed)
        self.clip.model.to(self.device)
        self.out = locate(out)

    def __call__(self, batch: dict) -> dict:
        stats = []
        for t, blob in zip(batch["task"], batch["loaded"]):
            task, loaded = ShardTask.from_json(t), pickle.loads(blob)
            stats.append(json.dumps(embed_part(self.clip, self.out, task, loaded, self.cfg.batch_size, self.device,
                                               self.cfg.patches)))
        return {"stats": stats, "placed": [self.placed] * len(stats)}


def embed_part(clip, out, task: ShardTask, loaded: list[dict], batch_size: int, device: str = "cpu",
               patches: bool = False) -> dict:
    """Embed a part's loaded records in batches of `batch_size` (in order) and write it."""
    from lumo_ray.data.manifest import ErrorRecord

    ok = [x for x in loaded if "pixels" in x]
    image, text, patch = [], [], []
    for i in range(0, len(ok), batch_size):
        chunk = ok[i:i + batch_size]
        image.append(clip.embed_images([x["pixels"] for x in chunk], device))
        text.append(clip.embed_texts([x["caption"] for x in chunk], device))
        if patches:
            patch.append(clip.embed_patches([x["pixels"] for x in chunk], device))
    dim = clip.dim
    errors = [ErrorRecord(id=x["id"], stage=x["error"]["stage"], reason=x["error"]["reason"], source=x["source"],
                          detail=x["error"]["detail"]).to_dict() for x in loaded if "error" in x]
    return parts.write_part(out, task.key, [x["id"] for x in ok],
                            np.concatenate(image) if image else np.zeros((0, dim), np.float32),
                            np.concatenate(text) if text else np.zeros((0, dim), np.float32), errors, task.digest,
                            no_image=sum(1 for x in loaded if x.get("skip")),
                            patches=(np.concatenate(patch) if patch else np.zeros((0, clip.patches, dim), np.float32))
                            if patches else None)


def run_embed(manifest: PathLike, cfg: LumoConfig, out_dir: PathLike, actors: int | None = None,
              address: str | None = None, log=print) -> dict:
    """Embed a manifest's images and captions into `<out>/<split>/part-NNNNNN.parquet` + index.json."""
    from lumo_ray.codecs.clip import load_clip

    out = locate(out_dir)
    ecfg = cfg.data.embed
    loaders, embedders = job_resources(cfg, "embed", actors)
    actors = embedders.count
    require_manifest(manifest)
    clip = load_clip(ecfg.model, ecfg.seed)  # the driver: the identity the parts depend on
    model = {"name": ecfg.model, "seed": ecfg.seed, "identity": clip.identity(), "dim": clip.dim,
             "image_size": clip.image_size, "patches": clip.patches if ecfg.patches else 0}
    digest = embed_config_digest(ecfg, model["identity"])
    for name in ("index.json", "index.json.tmp"):
        (out / name).unlink(missing_ok=True)
    plan = plan_manifest(manifest, ecfg.shard_size, digest, out, log=log)
    stats = parts.finished_parts(out, {t.key: t.digest for t in plan.tasks})
    todo = [t for t in plan.tasks if t.key not in stats]
    log(f"[embed] {plan.records} records -> {len(plan.tasks)} parts ({len(stats)} complete, {len(todo)} to write), "
        f"{actors} embedding actor(s), CLIP {ecfg.model} ({model['dim']}-d, {model['identity'][:12]})")
    if todo:
        init_ray(address)
        require_fit([loaders, embedders])
        blob = pickle.dumps(ecfg)
        ds = ray.data.from_items([{"task": t.to_json()} for t in todo], override_num_blocks=min(len(todo), MAX_BLOCKS))
        ds = ds.map_batches(EmbedLoader, fn_constructor_args=(blob, plan.manifest, plan.base), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=loaders.count), **loaders.ray_options())
        ds = ds.map_batches(EmbedWriter, fn_constructor_args=(blob, str(out)), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=actors), **embedders.ray_options())
        before, placed = len(stats), set()
        bar = Progress(len(todo), "[embed] parts", "parts", log)
        for row in ds.iter_rows():
            st = json.loads(row["stats"])
            key = (st["split"], st["index"])
            stats[key] = st
            placed.add(row["placed"])
            done = len(stats) - before
            bar.update(done, lambda: f"[embed] {len(stats)}/{len(plan.tasks)} parts, last {key[0]}/"
                       f"{parts.part_of(out, key).name}: {st['rows']} rows, {len(st['errors'])} errors "
                       f"({bar.rate(done)})")
        bar.close()
        log(f"[embed] embedding actors computed on: {'; '.join(sorted(placed))}")
    summary = parts.finish(out, stats, plan.read_errors, model, digest)
    log(f"[embed] done: {summary['rows']} images embedded in {len(plan.tasks)} parts, {summary['errors']} errors, "
        f"{summary['no_image']} records without an image -> {out / 'index.json'}")
    return summary
