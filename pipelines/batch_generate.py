"""`lumo generate --manifest M --task T --out DIR`: generation over a dataset on a Ray Data actor pool.

Each actor loads the run once; a unit of records is one task. The driver writes a unit's media files
and its parts file (temp name + rename) as the unit comes back, so a killed run keeps what it finished;
results.jsonl (the units in manifest order), errors.jsonl and summary.json are written at the end.
The bytes are the same for any number of actors (lumo_ray/batch_generate.py says why).
"""
from __future__ import annotations

import base64
import json
from dataclasses import asdict
from pathlib import Path

import ray

from lumo_ray.batch_generate import applicable, generate_unit, plan_units, unit_name, unit_payload
from lumo_ray.config import LumoConfig
from lumo_ray.data.manifest import ErrorRecord, dropped_warning, read_manifest, write_errors
from lumo_ray.generate import GenOptions
from lumo_ray.resources import job_resources
from lumo_ray.runtime import Progress
from lumo_ray.storage import resolve, write_file

from .ray_env import init_ray, placement, unit_device
from .status import require_fit


class UnitGenerator:
    """Ray Data actor: the run loaded once, on the device Ray gave the actor (at one torch thread:
    sampling is bit-reproducible only at a fixed count); one unit of records per call."""

    def __init__(self, run_dir: str, task: str, opts: dict, n: int):
        import torch

        from lumo_ray.generate import load_run, require_same_space

        torch.set_num_threads(1)
        device, ids = unit_device()
        self.placed = placement(device, ids)
        self.run = load_run(run_dir, device=str(device))
        require_same_space(self.run)
        self.task, self.opts, self.n = task, opts, n

    def __call__(self, batch: dict) -> dict:
        out = [json.dumps(generate_unit(self.run, self.task, json.loads(u), self.opts, self.n)) for u in batch["unit"]]
        return {"k": batch["k"], "result": out, "placed": [self.placed] * len(out)}


def run_batch_generate(manifest: str, run_dir: str, task: str, out_dir: str | Path, opts: GenOptions, n: int = 1,
                       actors: int | None = None, unit_size: int | None = None, address: str | None = None,
                       log=print, cfg: LumoConfig | None = None) -> dict:
    """cfg: its `generate` section sizes the actors (CPUs, GPUs); actors / unit_size override it."""
    cfg = cfg or LumoConfig()
    groups = job_resources(cfg, "generate", actors)
    actors, unit_size = groups[0].count, unit_size or cfg.generate.unit_size
    out = Path(out_dir)
    records, read_errors = read_manifest(manifest)
    items, skipped = applicable(records, task)
    units = plan_units(items, unit_size)
    settings = {"manifest": str(Path(manifest).resolve()), "run": resolve(run_dir), "task": task, "n": n,
                "unit_size": unit_size, "options": asdict(opts)}
    parts = out / "parts"
    if (out / "options.json").exists() and json.loads((out / "options.json").read_text()) != settings:
        raise ValueError(f"{out} holds a generation with other settings ({out / 'options.json'}); "
                         "give a new --out, or the same settings to finish it")
    parts.mkdir(parents=True, exist_ok=True)
    write_file(out / "options.json", json.dumps(settings, indent=2) + "\n")
    for stale in parts.glob("*.tmp"):  # a unit a killed run was writing
        stale.unlink()
    todo = [k for k in range(len(units)) if not (parts / unit_name(k)).exists()]
    log(f"[generate] {len(items)} of {len(records)} records for {task} -> {len(units)} units of {unit_size} "
        f"({len(units) - len(todo)} done, {len(todo)} to generate), {actors} actor(s)"
        + (f"; not for {task}: " + ", ".join(f"{c} {w}" for w, c in skipped.items()) if skipped else ""))
    if todo:
        init_ray(address)
        require_fit(groups)
        ds = ray.data.from_items([{"k": k, "unit": unit_payload(units[k])} for k in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(UnitGenerator, fn_constructor_args=(resolve(run_dir), task, asdict(opts), n), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=actors), **groups[0].ray_options())
        bar, placed = Progress(len(todo), "[generate] units", "units", log), set()
        for done, row in enumerate(ds.iter_rows(), 1):
            k, res = int(row["k"]), json.loads(row["result"])
            placed.add(row["placed"])
            for name, b64 in res["files"].items():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                write_file(out / name, base64.b64decode(b64), root=out)
            write_file(parts / unit_name(k), res["rows"])  # temp + rename: the unit counts as done only now
            bar.update(done, lambda: f"[generate] {done}/{len(todo)} units ({bar.rate(done)})")
        bar.close()
        log(f"[generate] actors computed on: {'; '.join(sorted(placed))}")
    rows = [json.loads(line) for k in range(len(units)) for line in (parts / unit_name(k)).read_text().splitlines()]
    ok = [r for r in rows if "error" not in r]
    errors = [e for e in read_errors] + [ErrorRecord(id=r["id"], stage=r["error"]["stage"], reason=r["error"]["reason"],
                                                     source=str(r.get("input") or ""), detail=r["error"]["detail"])
                                         for r in rows if "error" in r]
    write_file(out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in ok))
    write_errors(errors, out / "errors.jsonl")
    samples = [s for r in ok for s in r["samples"]]
    summary = {"records": len(records), "for_task": len(items), "generated": len(ok), "errors": len(errors),
               "skipped": skipped, "units": len(units), "samples": len(samples),
               "compliant": sum(s["ok"] for s in samples)}
    write_file(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"[generate] done: {len(ok)} records, {summary['compliant']}/{len(samples)} samples compliant, "
        f"{len(errors)} errors -> {out / 'results.jsonl'}")
    warn = dropped_warning([e.reason for e in errors], len(items) + len(read_errors), out / "errors.jsonl")
    if warn:
        log(f"[generate] {warn}")
    return summary
