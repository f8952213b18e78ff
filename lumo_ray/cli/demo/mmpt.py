"""The stage-4 part of `lumo demo`: any-to-any training from the stage-3.3 run, then every gate on
the stage-4 run (modality ablation, generation fidelity; the generate stage adds decode compliance and
the prompt ablation)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ...config import LumoConfig, load_config
from ...config.recipes import DEMO_MMPT  # lumo_ray/assets/demo/mmpt.yaml (measured table in docs/stage4_mmpt.md)
from ...storage import write_file


def mmpt_demo_config(data_settings: list[str], config: str | Path | None, sets: list[str] | None) -> LumoConfig:
    """Stage-4 defaults under the user's --config, the demo's data settings and DEMO_MMPT over it, --set last."""
    from trainers.mmpt import MMPT_DEFAULTS

    return load_config(LumoConfig, config, list(data_settings) + DEMO_MMPT + list(sets or []), defaults=MMPT_DEFAULTS)


def run_mmpt_demo(out_dir: Path, shards: Path, init_run: Path, base: Path, cfg: LumoConfig, log=print,
                  address: str | None = None) -> dict:
    """Train stage 4 from `init_run` -> modality ablation -> generation fidelity. Returns
    {"pass", "run", "stages": {name: {...}}}."""
    from trainers.mmpt import run_mmpt

    from ...eval.fidelity import run_fidelity
    from ...eval.modality_ablation import run_modality_ablation
    from ...eval.training_gates import TOKEN_LM_MIN_GAIN, token_lm_verdict
    from .lm import step_runner

    out = Path(out_dir).resolve()
    cfg = copy.deepcopy(cfg)
    c = cfg.token_lm
    c.shards, c.base, c.out, c.mmpt.init = str(shards), str(base), str(out / "mmpt"), str(init_run)
    stages: dict = {}
    stage = step_runner(stages, "mmpt demo", log)

    def train() -> dict:
        m = run_mmpt(cfg, address=address, log=log)
        start = m["eval_at_start"]
        return {"pass": token_lm_verdict(m), "eval_at_start": {k[5:] if k != "eval_loss" else "all": round(v, 4) for k, v in start.items()},
                "rule": f"every task's eval loss below its warm start; all tasks >= {TOKEN_LM_MIN_GAIN} below",
                "eval": {k: round(v, 4) for k, v in m["eval"].items()},
                "train": {k: round(v, 4) for k, v in m.get("train_tasks", {}).items()},
                "trainable": m["trainable"], "golden": m.get("golden", []), "evals": m.get("evals", [])}

    def ablation() -> dict:
        rep = run_modality_ablation(out / "mmpt", out / "modality_ablation", cfg)
        return {"pass": rep["pass"], **{m: {k: r[k] for k in ("shuffle", "noise") if k in r} for m, r in
                                        rep["modalities"].items()}}

    def fidelity() -> dict:
        rep = run_fidelity(out / "mmpt", out / "fidelity", log=log)
        return {"pass": rep["pass"], "report": str(out / "fidelity" / "report.md"),
                "attributes": {f"{m}.{a}": {k: r.get(k) for k in ("chance", "ceiling", "generated", "swapped", "gated", "pass",
                                                                                 "probe_reads")}
                               for m, mr in rep.get("modalities", {}).items() for a, r in mr.get("attributes", {}).items()}}

    stage("train", train)
    if "error" not in stages["train"]:  # a failed verdict still shows the gates' numbers (lm.run_lm_demo)
        stage("modality_ablation", ablation)
        stage("fidelity", fidelity)
    ok = all(s["pass"] for s in stages.values()) and len(stages) == 3
    write_file(out / "mmpt_demo.json", json.dumps({"pass": ok, "stages": stages}, indent=2, default=str) + "\n")
    return {"pass": ok, "run": str(out / "mmpt"), "stages": stages}
