"""One launcher for the tiny codec fits (`lumo codec train-vq`, `lumo codec train-audio`) on Ray Train.

Thin: each fit is named "module:function" and called as `fit(section, log=, report=, out_dir=)`: the
tiny VQ's training on the one loop (trainers/codec_vq.py), the audio codec's closed-form fit (library
code, lumo_ray/codecs/audio_train.py: statistics and k-means, no gradient steps). This file checks the
section, hands the fit to a TorchTrainer through trainers/launch.py's `launch` and trainers/context.py's
`RayContext` and reads metrics.json back.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional

from lumo_ray.config import LumoConfig, dump_config, to_dict
from lumo_ray.tracking import open_tracker

from trainers.context import RayContext
from trainers.launch import launch, storage_of


def _worker(config: dict) -> None:
    cfg: LumoConfig = config["cfg"]
    ctx = RayContext()
    if ctx.rank != 0:  # (fit_codec refuses num_workers != 1; kept for safety)
        return
    c = getattr(cfg, config["section"])
    module, name = config["fit"].split(":")
    fit = getattr(importlib.import_module(module), name)
    tracker = open_tracker(Path(c.out), cfg.tracking, config["name"], to_dict(c))
    reports = [0]

    def report(m: dict) -> None:
        reports[0] += 1
        ctx.report(m)
        tracker.log(int(m.get("step", reports[0])), m)  # fits that report no step count their reports

    fit(c, log=lambda s: print(s, flush=True), report=report, out_dir=Path(c.out))
    tracker.close()


def fit_codec(cfg: LumoConfig, section: str, fit: str, name: str, real_limit: str, why_one: str,
              address: Optional[str] = None) -> dict:
    """Run `fit` ("module:function") on one Ray Train worker over config section `section`; returns the
    run's metrics.json (model.safetensors beside it). `real_limit` names the section's real-data count
    field; `why_one` says why the fit takes exactly one worker."""
    from lumo_ray.packaged import real_data_dir
    from lumo_ray.storage import locate, resolve

    c = getattr(cfg, section)
    if c.num_workers != 1:
        raise ValueError(f"{section}.num_workers={c.num_workers}: {why_one}")
    if not locate(c.out).is_local:
        raise ValueError(f"{section}.out={c.out!r}: give a local or shared-FS directory")
    c.out = resolve(c.out)  # absolute: the worker runs in another directory
    if getattr(c, real_limit) > 0:  # absolute, and a missing folder is an error rather than no real data
        c.real_data = str(real_data_dir(c.real_data).resolve())
    if c.storage_path:
        c.storage_path = resolve(c.storage_path)
    dump_config(cfg, c.out)
    launch(_worker, {"cfg": cfg, "section": section, "fit": fit, "name": name}, c, storage_of(c, c.out), name,
           address, section=section)
    return json.loads((Path(c.out) / "metrics.json").read_text())
