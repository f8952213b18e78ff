"""Every gate of a demo run as a row: the statistic it measured, the threshold it had to meet, the
verdict and one sentence of what it means, read back from the reports the stages wrote (so the
report.html table says exactly what the gates decided). `stage_gates(stage, dir)` -> rows."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from .stats import passes

Row = dict[str, Any]  # gate, statistic, threshold, pass, meaning, link (a report beside the stage, or "")


def _load(p: Path) -> Optional[dict]:
    return json.loads(p.read_text()) if p.exists() else None


def _f(v: Any, n: int = 3) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{n}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{n}f}"


def _link(stage_dir: Path, p: Path) -> str:
    md = p.with_suffix(".md") if p.with_suffix(".md").exists() else p
    return str(md.relative_to(stage_dir.parent)) if md.exists() else ""


def paired(s: dict) -> str:
    """'gap +0.243 [0.202, 0.291], win 0.97, p 1.1e-16, n 64' for a paired comparison (eval/stats.py)."""
    ci = s.get("ci95") or [float("nan")] * 2
    win = s.get("win", s.get("win_rate"))
    return (f"gap {s.get('gap', float('nan')):+.3f} [{ci[0]:.3f}, {ci[1]:.3f}], win {_f(win, 2)}, "
            f"p {s.get('p', float('nan')):.1e}, n {s.get('n', s.get('wins', 0) + s.get('losses', 0))}")


def _row(gate: str, statistic: str, threshold: str, ok: Any, meaning: str, link: str = "") -> Row:
    return {"gate": gate, "statistic": statistic, "threshold": threshold, "pass": bool(ok), "meaning": meaning,
            "link": link}


def uti_gates(d: Path) -> list[Row]:
    s = _load(d / "samples.json") or []
    text = [r for r in s if r.get("modality") == "text"]
    ok = sum(bool(r.get("roundtrip")) for r in text)
    return [_row("text round trip", f"{ok}/{len(text)} captions decode to themselves", "all", ok == len(text),
                 "the text tokenizer loses nothing: what the LM reads is what the caption said")]


def audit_gates(d: Path) -> list[Row]:
    rep = _load(d / "report.json")
    if not rep:
        return []
    failed = [k for k, v in rep["checks"].items() if not v]
    rows = [_row("UTI checks", f"{len(rep['checks']) - len(failed)}/{len(rep['checks'])} pass"
                 + (f"; failed: {', '.join(failed)}" if failed else ""), "all", not failed,
                 "determinism, id ranges, round trips and finite decodes of every adapter", _link(d, d / "report.json"))]
    for k, r in rep.get("regression", {}).items():
        rows.append(_row(f"audit {k}", f"{_f(r.get('run'))} (baseline {_f(r.get('baseline'))})", r["rule"], r["pass"],
                         "no worse than the committed baseline of this codec: the tiny codecs are random or tiny, "
                         "so absolute quality is low by design; what is gated is that it does not get worse",
                         _link(d, d / "report.json")))
    return rows


def data_gates(d: Path) -> list[Row]:
    rep = _load(d / "verify" / "report.json")
    if not rep:
        return []
    means = {"token_space": "shards, index and config name the same token space",
             "records": "every record reads back with valid ids in the right ranges",
             "leakage": "no id or group is in both train and eval",
             "retokenize": "re-tokenizing the raw files gives the same ids (deterministic)",
             "decode": "a seeded choice of records decodes back to media"}
    return [_row(f"verify {k}", v.get("summary", ""), "no problem", v["pass"], means.get(k, ""),
                 _link(d, d / "verify" / "report.json")) for k, v in rep["checks"].items()]


def vlm_gates(d: Path) -> list[Row]:
    rep = _load(d / "vlm_ablation" / "ablation.json")
    if not rep:
        return []
    thr = f"gap > 0, win >= {rep.get('min_win_rate')}, p < {rep.get('max_p')}, n >= {rep.get('min_n')}"
    means = {"shuffled": "captions need this image's visual tokens, not any image's",
             "zero": "captions need visual tokens at all", "noise": "real visual tokens beat random ones",
             "zero_vs_shuffled": "another image's tokens still beat none (the order correct < shuffled < zeroed)"}
    link = _link(d, d / "vlm_ablation" / "ablation.json")
    return [_row(f"VLM ablation: {k}", paired(s), thr, rep["checks"].get(k), means.get(k, ""), link)
            for k, s in rep.get("stats", {}).items()]


def modality_rows(rep: dict, link: str, prefix: str) -> list[Row]:
    thr, rows = rep["thresholds"], []
    for m, r in rep["modalities"].items():
        for cond in ("shuffle", "noise"):
            if cond not in r:
                continue
            s, t = r[cond], thr[cond]
            ok = passes(s, t["gap"], t["win"], thr["p"])  # the gate's own rule (modality_ablation.py)
            rows.append(_row(f"{prefix} {m} {cond}", paired(s), f"gap >= {t['gap']}, win >= {t['win']}, p < {thr['p']}",
                             ok, f"the caption loss rises when the {m} is {'another sample' if cond == 'shuffle' else 'noise'}"
                                 f": the model reads the {m} it is given", link))
    return rows


def _demo_stage_rows(st: dict) -> list[Row]:
    rows = []
    for name, v in st.items():
        if name == "base_lm":
            rows.append(_row("base LM", f"perplexity {v.get('perplexity')} (unigram {v.get('unigram_perplexity')})",
                             v.get("rule", ""), v["pass"], "the base LM learned the captions' language beyond word counts"))
        elif name in ("token_lm", "train"):
            start = v.get("eval_at_start")
            starts = start if isinstance(start, dict) else {}
            per_task = ", ".join(f"{k} {_f(x)}" + (f" (from {_f(starts[k])})" if k in starts else "")
                                 for k, x in (v.get("eval") or {}).items())
            head = f"eval loss {_f(v['eval_loss'])} (from {_f(start)}); " if "eval_loss" in v else ""
            rows.append(_row("token LM training" if name == "token_lm" else "stage-4 training",
                             f"{head}per task: {per_task}", v.get("rule", ""), v["pass"],
                             "training improved on the model it started from"))
        elif name == "text_invariance":
            rows.append(_row("text invariance", f"max |logit diff| {v.get('max_abs_logit_diff')}", "0 (new_rows)",
                             v["pass"], "text-only prompts give the base LM's logits: the new rows left text alone"))
        elif name == "prompt_study":
            rows.append(_row("prompt study", f"{v.get('trials')} trials, best objective {_f(v.get('best_objective'))}, "
                             f"best passes the modality ablation: {v.get('best_ablation_pass')}",
                             v.get("rule", "the best trial passes the modality ablation"), v["pass"],
                             "the study's best prompt / sequence choice gives a model that reads its media"))
        elif "error" in v:
            rows.append(_row(name, v["error"][:200], "-", False, "the step crashed"))
    return rows


def lm_gates(d: Path) -> list[Row]:
    demo = _load(d / "lm_demo.json") or {"stages": {}}
    rows = _demo_stage_rows(demo["stages"])
    rep = _load(d / "modality_ablation" / "report.json")
    if rep:
        at = next((i for i, r in enumerate(rows) if r["gate"] == "text invariance"), len(rows))
        rows[at:at] = modality_rows(rep, _link(d, d / "modality_ablation" / "report.json"), "3.3 modality ablation:")
    return rows


def mmpt_gates(d: Path) -> list[Row]:
    demo = _load(d / "mmpt_demo.json") or {"stages": {}}
    rows = _demo_stage_rows({k: v for k, v in demo["stages"].items() if k == "train" or "error" in v})
    rep = _load(d / "modality_ablation" / "report.json")
    if rep:
        rows += modality_rows(rep, _link(d, d / "modality_ablation" / "report.json"), "stage-4 modality ablation:")
    fid = _load(d / "fidelity" / "report.json")
    for m, r in (fid or {}).get("modalities", {}).items():
        for a, v in r.get("attributes", {}).items():
            if not v.get("gated"):
                continue
            pr = v.get("paired", {})
            rows.append(_row(f"fidelity {m} {a}",
                             f"generated {_f(v['generated'], 2)} (chance {_f(v['chance'], 2)}, real {_f(v['ceiling'], 2)}, "
                             f"swapped caption {_f(v['swapped'], 2)}), p {pr.get('p', float('nan')):.1e}",
                             f">= {_f(v.get('target'), 2)} and above swapped, p < 0.01", v["pass"],
                             f"a probe reads the caption's {a} back from generated {m} codes"
                             + (f" ({v['reason']})" if v.get("reason") else ""),
                             _link(d, d / "fidelity" / "report.json")))
    return rows


def generate_gates(d: Path) -> list[Row]:
    rows = []
    dec = _load(d / "gate_decode" / "report.json")
    for t, r in (dec or {}).get("constrained", {}).items():
        rows.append(_row(f"decode compliance {t}", f"{round(r['compliant'] * r['n'])}/{r['n']} compliant"
                         + (f"; {r['errors'][0]}" if r.get("errors") else ""), "all", r["pass"],
                         "every generated span has the task's grammar, length and end token",
                         _link(d, d / "gate_decode" / "report.json")))
    pr = _load(d / "gate_prompts" / "report.json")
    if pr:
        th = pr["thresholds"]
        for t, r in pr["tasks"].items():
            for other, key in (("swapped", "win_swapped"), ("empty", "win_empty")):
                s = r.get(other)
                if not s:
                    continue
                ok = passes(s, None, th[key], th["p"])  # the gate's own rule (gates.py)
                rows.append(_row(f"prompt ablation {t} vs {other}", paired(s),
                                 f"win >= {th[key]}, p < {th['p']}", ok,
                                 f"the true caption predicts the target better than {'another' if other == 'swapped' else 'no'} "
                                 "caption: generation follows the prompt", _link(d, d / "gate_prompts" / "report.json")))
    return rows


STAGES: dict[str, Callable[[Path], list[Row]]] = {
    "uti": uti_gates, "audit": audit_gates, "data": data_gates, "vlm": vlm_gates, "lm": lm_gates,
    "mmpt": mmpt_gates, "generate": generate_gates,
}

# What to look at first in each stage's section of the report.
LOOK_AT = {
    "uti": "The token-space table (id ranges per modality) and the real inputs beside their decodes; the "
           "tiny codecs are small or random, so decodes are rough by design.",
    "audit": "The regression rows: each metric against the committed baseline of this codec. A negative "
             "audio SNR is what the tiny random-init codec does; the gate is that it does not get worse.",
    "data": "Verify's five checks and the token-length histograms (audio spans fixed by clip length, "
            "captions short).",
    "vlm": "The ablation rows: the correct image must beat shuffled, zeroed and noise visual tokens, "
           "with p < 0.01 on the held-out set.",
    "lm": "The 3.3 modality ablation (the token LM reads image and audio codes) and text invariance "
          "(exactly 0 for new_rows).",
    "mmpt": "Fidelity: generated colour and pitch read back far above the swapped-caption floor; then the "
            "golden generations across checkpoints.",
    "generate": "The prompt ablation rows (the true caption beats a swapped one) and the generated images "
                "and clips for fixed captions.",
}


def stage_gates(stage: str, stage_dir: Path) -> list[Row]:
    """The gate rows of one demo stage from the reports in its directory ([] for an unknown stage)."""
    fn = STAGES.get(stage)
    return fn(Path(stage_dir)) if fn else []
