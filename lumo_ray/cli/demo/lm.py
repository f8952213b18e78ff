"""The lm part of `lumo demo`: base LM -> token LM (new_rows) -> modality ablation -> text invariance
-> a small prompt study (on the shard set pipelines/synth_shards.py builds)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ...config import LumoConfig
from ...eval.training_gates import BASE_LM_PPL_RATIO, TOKEN_LM_MIN_GAIN, base_lm_verdict, token_lm_verdict
from ...storage import write_file


def step_runner(steps: dict, tag: str, log):
    """stage(name, fn): runs one step of a demo stage, records {pass, seconds, ...} under steps[name]
    and logs it (its start and end lines with the demo's elapsed time, a heartbeat line through its
    silences); an exception is a failed step with its reason, and the steps after it still run."""
    from ...runtime import elapsed, heartbeat

    def stage(name: str, fn) -> dict:
        t0 = time.time()
        log(f"[{tag}] {name} ({elapsed()})")
        try:
            with heartbeat(f"in {tag}: {name}", log):
                res = fn()
        except Exception as e:  # a failed step is a failed gate, reported with its reason
            res = {"pass": False, "error": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.time() - t0, 1)
        steps[name] = res
        log(f"[{tag}] {name}: {'PASS' if res['pass'] else 'FAIL'} in {res['seconds']} s ({elapsed()})"
            + (f" {res['error']}" if "error" in res else ""))
        return res
    return stage


def run_lm_demo(out_dir: Path, shards_dir: Path, manifest: Path, cfg: LumoConfig, log=print) -> dict:
    """Base LM on the manifest captions -> token LM (new_rows) warm-started from it -> modality
    ablation -> text invariance -> a 2-trial prompt study. Returns {"pass", "stages": {name: {...}}}."""
    import copy

    from trainers.lm import run_lm
    from trainers.token_lm import run_token_lm
    from trainers.tune_prompts import run_prompt_study

    from ...eval.modality_ablation import run_modality_ablation
    from ...eval.text_invariance import run_text_invariance

    out = Path(out_dir).resolve()
    cfg = copy.deepcopy(cfg)
    stages: dict = {}
    stage = step_runner(stages, "lm demo", log)

    cfg.lm.inputs, cfg.lm.out = [str(Path(manifest).resolve())], str(out / "lm")
    base = out / "lm" / "export"

    def base_lm() -> dict:
        m = run_lm(cfg, log=log)
        ppl, uni = m["perplexity"], m["unigram_perplexity"]
        return {"pass": base_lm_verdict(m), "eval_loss": round(m["eval_loss"], 4),
                "perplexity": round(ppl, 2), "unigram_perplexity": round(uni, 2),
                "rule": f"perplexity <= {BASE_LM_PPL_RATIO} x unigram perplexity", "export": m["export"]}

    c = cfg.token_lm
    c.shards, c.base, c.out, c.freeze = str(Path(shards_dir).resolve()), str(base), str(out / "token_lm"), "new_rows"

    def token_lm() -> dict:
        m = run_token_lm(cfg, log=log)
        start = m["eval_at_start"]["eval_loss"]
        return {"pass": token_lm_verdict(m), "eval_loss": round(m["eval_loss"], 4),
                "eval_at_start": round(start, 4), "rule": f"eval loss <= warm-start eval loss - {TOKEN_LM_MIN_GAIN}, "
                                                          "every task below its warm start",
                "eval": {k: round(v, 4) for k, v in m["eval"].items()}, "trainable": m["trainable"],
                "export": m["export"]}

    def ablation() -> dict:
        rep = run_modality_ablation(out / "token_lm", out / "modality_ablation", cfg)
        return {"pass": rep["pass"], **{m: {k: r[k] for k in ("shuffle", "noise") if k in r} for m, r in
                                        rep["modalities"].items()}}

    def invariance() -> dict:
        rep = run_text_invariance(out / "token_lm", str(base), out / "text_invariance", cfg)
        return {"pass": rep["pass"], "max_abs_logit_diff": rep["max_abs_logit_diff"],
                "new_row_prob_mass": rep["new_row_prob_mass"]["mean"]}

    def study() -> dict:
        s = copy.deepcopy(cfg)
        ps = s.token_lm.prompt_study
        # trials as long as the 3.3 run, which reads its media at that length: the verdict is the best
        # trial's modality ablation, and at 60 steps its image shuffle gap was +0.03 (docs/gates.md)
        steps = s.token_lm.train.steps
        ps.num_samples, ps.steps, ps.report_every, ps.out = 2, steps, steps // 2, str(out / "tune_prompts")
        res = run_prompt_study(s, log=log)
        best = res["best"] or {}
        return {"pass": res["pass"], "trials": len(res["trials"]), "best_objective": best.get("objective"),
                "best_ablation_pass": best.get("ablation_pass"), "rule": "the best trial passes the modality ablation",
                "best": {k: best.get(k) for k in ("instruction", "delimiters", "new_row_lr")}}

    # a failed verdict does not stop the steps after it (their numbers still show, the stage still
    # fails); a step that crashed, and so wrote nothing to build on, does
    stage("base_lm", base_lm)
    if "error" not in stages["base_lm"]:
        stage("token_lm", token_lm)
        if "error" not in stages["token_lm"]:
            stage("modality_ablation", ablation)
            stage("text_invariance", invariance)
            stage("prompt_study", study)
    ok = all(s["pass"] for s in stages.values()) and len(stages) == 5
    write_file(out / "lm_demo.json", json.dumps({"pass": ok, "stages": stages}, indent=2, default=str) + "\n")
    return {"pass": ok, "stages": stages}
