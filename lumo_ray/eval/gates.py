"""Generation gates of stage 3.4 (docs/gates.md).

decode compliance: on a golden set of prompts per task (captions and media of the synthetic
generator, fixed by a seed), generated spans must be 100% well-formed (opening token, end token,
nothing after), 0 ids outside the modality's ids, audio codebook phase right, exact length, 100%
decoded without error, and the export's token-space hash must equal the one the run's config
builds. The same numbers are reported with the constraint off (they do not gate).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..data import synth
from ..data.mix import primary
from ..generate import (TARGET, GenOptions, Run, SpanCheck, build_prompt, check_and_decode, generate_spans,
                        save_output, task_spec)
from ..runtime import torch_threads
from ..storage import write_file
from .stats import MAX_P, cell, paired, passes

GOLDEN_TASKS = ("t2i", "t2a", "i2t", "a2t")


def available_tasks(run: Run) -> list[str]:
    has = {"image": run.ts.has_image and run.adapters.image is not None,
           "audio": run.ts.num_codebooks > 0 and run.adapters.audio is not None}
    return [t for t in GOLDEN_TASKS if has["image" if t in ("t2i", "i2t") else "audio"]]


# -- golden set ---------------------------------------------------------------------------------

def _image_combos() -> list[tuple]:
    return [(s, c, k, p) for s in synth.SHAPES for c in synth.COLOURS for k in (1, 2, 3, 4) for p in synth.POSITIONS]


def _audio_combos() -> list[tuple]:
    return [(k, ln, p) for k in (1, 2, 3, 4) for ln in synth.LENGTHS for p in synth.PITCHES]


def golden_set(run: Run, task: str, n: int, seed: int = 0) -> list[dict]:
    """n golden prompts of a task: {'id', 'caption' (t2x) or 'source' (x2t), 'prompt' ids}. Content
    is a pure function of (task, n, seed): the same golden set on every machine."""
    combos = _image_combos() if task in ("t2i", "i2t") else _audio_combos()
    rng = np.random.default_rng([seed, GOLDEN_TASKS.index(task)])
    order = [combos[i % len(combos)] for i in np.concatenate([rng.permutation(len(combos))
                                                               for _ in range(-(-n // len(combos)))])[:n]]
    out = []
    if task == "t2i":
        for i, c in enumerate(order):
            cap = synth.image_caption(*c)
            out.append({"id": f"t2i-{i:03d}", "caption": cap, "prompt": build_prompt(run, task, caption=cap)})
    elif task == "t2a":
        for i, c in enumerate(order):
            cap = synth.audio_caption(*c)
            out.append({"id": f"t2a-{i:03d}", "caption": cap, "prompt": build_prompt(run, task, caption=cap)})
    elif task == "i2t":
        ad = run.adapters.image
        ims = [ad.prepare(synth.make_image(*c, synth.BACKGROUNDS[i % len(synth.BACKGROUNDS)], (0, 0)), f"golden-{i}")
               for i, c in enumerate(order)]
        with torch_threads(1):
            codes = ad.encode_batch(ims)
        for i, (c, code) in enumerate(zip(order, codes)):
            out.append({"id": f"i2t-{i:03d}", "source": synth.image_caption(*c),
                        "prompt": build_prompt(run, task, media_ids=run.ts.image_to_global(code), sid=f"i2t-{i:03d}")})
    elif task == "a2t":
        ad = run.adapters.audio
        clips = [ad.prepare(synth.make_beeps(*c, np.random.default_rng([seed, 7, i])), synth.SAMPLE_RATE, f"golden-{i}")
                 for i, c in enumerate(order)]
        with torch_threads(1):
            codes = ad.encode_batch(clips)
        for i, (c, code) in enumerate(zip(order, codes)):
            out.append({"id": f"a2t-{i:03d}", "source": synth.audio_caption(*c),
                        "prompt": build_prompt(run, task, media_ids=run.ts.audio_to_global(code.codes), sid=f"a2t-{i:03d}")})
    else:
        raise ValueError(f"unknown task {task!r}")
    return out


# -- metrics ------------------------------------------------------------------------------------

def summarize(checks: list[SpanCheck], modality: str) -> dict:
    """Rates over a task's spans; `pass` is the decode compliance gate."""
    n = len(checks)
    ids = sum(max(c.length, 0) for c in checks)
    m = {
        "n": n,
        "well_formed": sum(c.well_formed for c in checks) / max(n, 1),
        "exact_length": sum(c.exact_length for c in checks) / max(n, 1),
        "out_of_range_ids": sum(c.out_of_range for c in checks),
        "out_of_range_rate": sum(c.out_of_range for c in checks) / max(ids, 1),
        "phase_errors": sum(c.phase_errors for c in checks),
        "phase_ok": sum(c.phase_errors == 0 for c in checks) / max(n, 1),
        "decoded": sum(c.decoded for c in checks) / max(n, 1),
        "compliant": sum(c.ok for c in checks) / max(n, 1),
        "mean_length": ids / max(n, 1),
        "errors": sorted({c.error for c in checks if c.error})[:3],
    }
    m["pass"] = bool(n > 0 and m["well_formed"] == 1.0 and m["exact_length"] == 1.0 and m["out_of_range_ids"] == 0
                     and m["phase_errors"] == 0 and m["decoded"] == 1.0)
    return m


def check_generations(run: Run, task: str, prompts: list[np.ndarray], gens: list[np.ndarray],
                      opts: GenOptions) -> tuple[list[SpanCheck], list]:
    """Check and decode every generated span (also usable on doctored spans)."""
    spec = task_spec(run, task, opts)
    checks, values = [], []
    with torch_threads(opts.threads):
        for i, (p, g) in enumerate(zip(prompts, gens)):
            chk, val = check_and_decode(run, spec, p, g, seed=opts.seed + i)
            checks.append(chk)
            values.append(val)
    return checks, values


def run_decode_gate(run: Run, out_dir: str | Path, n: int = 64, opts: Optional[GenOptions] = None,
                    tasks: Optional[list[str]] = None, save_samples: int = 4, log=print) -> dict:
    """Decode-compliance gate -> out_dir/report.json (+ report.md and sample files)."""
    opts = opts or GenOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = tasks or available_tasks(run)
    rep: dict = {"gate": "decode_compliance", "run": run.name, "n": n, "tasks": tasks,
                 "token_space": {"export": run.ts.hash, "config": run.config_hash, "match": run.hash_match},
                 "options": asdict(opts), "constrained": {}, "unconstrained": {}, "samples": {}}
    for task in tasks:
        gold = golden_set(run, task, n, opts.seed)
        prompts = [g["prompt"] for g in gold]
        for mode, on in (("constrained", True), ("unconstrained", False)):
            o = GenOptions(**{**asdict(opts), "constrained": on})
            gens = generate_spans(run, task, prompts, o)
            checks, values = check_generations(run, task, prompts, gens, o)
            rep[mode][task] = summarize(checks, TARGET[task])
            if on:
                rep["samples"][task] = _save_samples(run, task, gold, values, checks, out / "samples" / task, save_samples)
            m = rep[mode][task]
            log(f"  {task} {mode:13s} compliant {m['compliant']:.2f}  well-formed {m['well_formed']:.2f}  "
                f"out-of-range {m['out_of_range_rate']:.3f}  exact length {m['exact_length']:.2f}  "
                f"decoded {m['decoded']:.2f}" + (f"  phase errors {m['phase_errors']}" if TARGET[task] == "audio" else ""))
    rep["pass"] = bool(run.hash_match and tasks and all(rep["constrained"][t]["pass"] for t in tasks))
    write_file(out / "report.json", json.dumps(rep, indent=2) + "\n")
    write_file(out / "report.md", decode_report_md(rep))
    return rep


def _save_samples(run: Run, task: str, gold: list[dict], values: list, checks: list[SpanCheck], d: Path,
                  k: int) -> list[dict]:
    rows = []
    for g, v, c in list(zip(gold, values, checks))[:k]:
        row = {"id": g["id"], "prompt": g.get("caption") or g.get("source"), "ok": c.ok, "file": None, "text": None}
        if v is not None:
            f = save_output(run, TARGET[task], v, d / g["id"])
            row["file"] = str(f.relative_to(d.parent.parent))
            if TARGET[task] == "text":
                row["text"] = str(v)
        rows.append(row)
    return rows


def decode_report_md(rep: dict) -> str:
    cols = ["compliant", "well_formed", "out_of_range_rate", "phase_errors", "exact_length", "decoded"]
    lines = [f"# Decode compliance: {'PASS' if rep['pass'] else 'FAIL'}", "", f"Model: {rep.get('run', '?')}.", "",
             f"{rep['n']} golden prompts per task; token space export {rep['token_space']['export'][:12]} vs config "
             f"{rep['token_space']['config'][:12]} ({'match' if rep['token_space']['match'] else 'MISMATCH'}).", "",
             "| task | mode | " + " | ".join(cols) + " | pass |", "|" + "---|" * (len(cols) + 3)]
    for t in rep["tasks"]:
        for mode in ("constrained", "unconstrained"):
            m = rep[mode][t]
            vals = [f"{m[c]:.3f}" if isinstance(m[c], float) else str(m[c]) for c in cols]
            lines.append(f"| {t} | {mode} | " + " | ".join(vals) + f" | {'yes' if m['pass'] else 'no'} |")
    lines += ["", "Unconstrained rows are reported for comparison and do not gate.", "", "## Samples (constrained)"]
    for t, rows in rep["samples"].items():
        lines += ["", f"### {t}", ""]
        for r in rows:
            f = r["file"]
            if r["text"] is not None:
                media = f"`{r['text']}`"
            elif f and f.endswith(".png"):
                media = f'<img src="{f}" width="96">'
            elif f and f.endswith(".wav"):
                media = f'<audio controls src="{f}"></audio>'
            else:
                media = "(not decodable)"
            lines.append(f"- **{r['id']}** {r['prompt']}: {media}")
    return "\n".join(lines) + "\n"


# -- prompt ablation ----------------------------------------------------------------------------

PROMPT_TASKS = {"t2i": "image", "t2a": "audio"}
MIN_WIN_SWAPPED = 0.70
MIN_WIN_EMPTY = 0.80


def _swap_partners(captions: list[list[int]], rng: np.random.Generator) -> list[int]:
    """For each sample another sample, preferring one with a different caption (a swap to the
    same caption proves nothing)."""
    n = len(captions)
    perm = rng.permutation(n)
    pos = {int(p): k for k, p in enumerate(perm)}
    out = []
    for i in range(n):
        k = pos[i]
        cands = [int(perm[(k + s) % n]) for s in range(1, n)]
        diff = [j for j in cands if captions[j] != captions[i]]
        out.append((diff or cands)[0])
    return out


def _without_caption(seq, text_start: int, n_caption: int):
    """The same sequence with the caption tokens removed (delimiters and target kept)."""
    from ..data.sequences import Sequence

    a = int(np.nonzero(seq.input_ids == text_start)[0][0]) + 1
    keep = np.r_[0:a, a + n_caption:seq.input_ids.size]
    return Sequence(seq.input_ids[keep], seq.labels[keep], seq.task, seq.id)


def _seq_losses(model, seqs: list, pad_id: int, batch_size: int) -> np.ndarray:
    import torch

    from ..data.sequences import collate
    from ..models.token_lm import target_losses

    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            loss, n = target_losses(model, collate(seqs[i: i + batch_size], pad_id))
            out += (loss / n.clamp(min=1)).tolist()
    return np.asarray(out)


def prompt_ablation(model, builder, samples: dict[str, list[dict]], seed: int = 0, batch_size: int = 16,
                    min_win_swapped: float = MIN_WIN_SWAPPED, min_win_empty: float = MIN_WIN_EMPTY) -> dict:
    """The prompt ablation gate (docs/gates.md). samples: {'t2i': [...], 't2a': [...]} shard samples holding the task's
    media. Per task: target-span loss (mean nats per target token) with the true caption, a caption
    swapped from another sample, and no caption; per comparison n, gap with 95% CI, win rate (true
    strictly lower) and sign-test p (lumo_ray/eval/stats.py); pass needs the win rates and p < 0.01."""
    model.eval()
    rep: dict = {"tasks": {}, "thresholds": {"win_swapped": min_win_swapped, "win_empty": min_win_empty, "p": MAX_P},
                 "seed": seed}
    ok = True
    ts_start = builder.sp["<|text_start|>"]
    for task in PROMPT_TASKS:
        ss = samples.get(task, [])
        if len(ss) < 2:
            rep["tasks"][task] = {"n": len(ss), "pass": False, "reason": f"{len(ss)} samples with {PROMPT_TASKS[task]}"}
            ok = False
            continue
        caps = [np.asarray(s["text"], np.int64).tolist() for s in ss]
        partners = _swap_partners(caps, np.random.default_rng([seed, len(task), 11]))
        true = [builder.build(s, task=task) for s in ss]
        swapped = [builder.build({**s, "text": np.asarray(caps[j], np.int64)}, task=task) for s, j in zip(ss, partners)]
        empty = [_without_caption(q, ts_start, len(c)) for q, c in zip(true, caps)]
        lt, ls, le = (_seq_losses(model, v, builder.pad_id, batch_size) for v in (true, swapped, empty))
        r = {"n": len(ss), "loss": {"true": float(lt.mean()), "swapped": float(ls.mean()), "empty": float(le.mean())},
             "swapped": paired(ls - lt, seed), "empty": paired(le - lt, seed),
             "same_caption_swaps": int(sum(caps[i] == caps[j] for i, j in enumerate(partners)))}
        r["pass"] = passes(r["swapped"], None, min_win_swapped) and passes(r["empty"], None, min_win_empty)
        ok = ok and r["pass"]
        rep["tasks"][task] = r
    rep["pass"] = ok
    return rep


def prompt_slice(shards: str | Path, ts, n: int, seed: int = 0, split: str = "eval") -> dict[str, list[dict]]:
    """Up to n samples per t2x task from a shard split (holding that task's media), chosen by seed."""
    from ..data.shard_reader import ShardDataset

    all_ = list(ShardDataset(shards, split, shuffle=False, expected=ts))
    out = {}
    for task, m in PROMPT_TASKS.items():
        have = sorted((s for s in all_ if m in s), key=lambda s: str(s["json"]["id"]))
        idx = np.random.default_rng([seed, len(task), 3]).permutation(len(have))[:n]
        out[task] = [have[i] for i in sorted(idx)]
    return out


def run_prompt_gate(run: Run, out_dir: str | Path, n: int = 256, shards: Optional[str] = None, seed: int = 0,
                    split: str = "eval", log=print) -> dict:
    """`lumo gate prompts`: the run's export on its shards' eval split -> report.json / report.md."""
    shards = shards or primary(run.cfg.token_lm.shards)  # a mix: its first source
    if not shards:
        raise ValueError(f"{run.name}: no shards (set token_lm.shards in the run config or pass --shards)")
    with torch_threads(1):
        rep = prompt_ablation(run.model, run.builder, prompt_slice(shards, run.ts, n, seed, split), seed)
    rep.update(gate="prompt_ablation", run=run.name, shards=str(shards), split=split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "report.json", json.dumps(rep, indent=2) + "\n")
    lines = [f"# Prompt ablation: {'PASS' if rep['pass'] else 'FAIL'}", "",
             f"win rate thresholds: vs swapped >= {rep['thresholds']['win_swapped']}, vs empty >= "
             f"{rep['thresholds']['win_empty']}, one-sided sign-test p < {rep['thresholds']['p']} each", "",
             "Each cell: mean loss gap (nats per target token) [bootstrap 95% CI] (win rate, p).", "",
             "| task | n | loss true | swapped gap | empty gap | pass |", "|---|---|---|---|---|---|"]
    for t, r in rep["tasks"].items():
        if "loss" not in r:
            lines.append(f"| {t} | {r['n']} | - | - | - | FAIL ({r['reason']}) |")
            log(f"  {t} FAIL: {r['reason']}")
            continue
        lines.append(f"| {t} | {r['n']} | {r['loss']['true']:.3f} | {cell(r['swapped'])} | {cell(r['empty'])} "
                     f"| {'PASS' if r['pass'] else 'FAIL'} |")
        log(f"  {t} n={r['n']} true {r['loss']['true']:.3f}  swapped {r['swapped']['gap']:+.3f} (win {r['swapped']['win']:.2f}, "
            f"p {r['swapped']['p']:.1g})  empty {r['empty']['gap']:+.3f} (win {r['empty']['win']:.2f}, p {r['empty']['p']:.1g})"
            f"  {'PASS' if r['pass'] else 'FAIL'}")
    write_file(out / "report.md", "\n".join(lines) + "\n")
    return rep
