"""`lumo demo`: the whole program on the embedded tiny default, offline, stage by stage.

Each stage prints progress, writes into its own folder under the demo directory, and adds a row
(name, pass, seconds, key numbers, folder) to `summary.json`. The demo exits non-zero when a gate fails.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from PIL import Image

from ...config import LumoConfig, dump_config
from ...data.shard_reader import ShardDataset
from ...eval import report
from ...eval.gate_rows import LOOK_AT, stage_gates
from ...runtime import torch_threads


def _real_data(cfg: LumoConfig) -> Path:
    from ...packaged import real_data_dir
    return real_data_dir(cfg.audit.real_data)


def stage_uti(cfg: LumoConfig, out: Path, log) -> dict:
    """Token space + a few real samples tokenized and decoded back to files."""
    from ...uti import build_adapters, build_token_space
    a = build_adapters(cfg.uti)
    ts = build_token_space(cfg.uti, a)
    ts.save(out)
    log(ts.table())
    real = _real_data(cfg)
    rows = []
    with torch_threads(cfg.uti.runtime.threads):
        wavs = sorted((real / "audiocaps" / "audio").glob("*.wav"))[:2]
        clips = [a.audio.load(str(p)) for p in wavs]
        for p, clip, codes in zip(wavs, clips, a.audio.encode_batch(clips)):
            ids = ts.audio_to_global(codes.codes)
            sf.write(out / f"{p.stem}.input.wav", clip.wav.T, a.audio.sample_rate)
            sf.write(out / f"{p.stem}.decoded.wav", a.audio.decode(codes).T, a.audio.sample_rate)
            rows.append({"input": str(p.relative_to(real)), "modality": "audio", "tokens": int(ids.size),
                         "first_ids": ids[:8].tolist()})
        pngs = sorted((real / "llava_pretrain" / "images").glob("*.png"))[:2]
        imgs = [a.image.load(str(p)) for p in pngs]
        for p, img, codes in zip(pngs, imgs, a.image.encode_batch(imgs)):
            ids = ts.image_to_global(codes)
            Image.fromarray((np.transpose(img.pixels, (1, 2, 0)) * 255).round().astype(np.uint8)).save(out / f"{p.stem}.input.png")
            Image.fromarray(a.image.decode(codes)).save(out / f"{p.stem}.decoded.png")
            rows.append({"input": str(p.relative_to(real)), "modality": "image", "tokens": int(ids.size),
                         "first_ids": ids[:8].tolist()})
    caps = json.loads((real / "llava_pretrain" / "blip_laion_cc_sbu_sample.json").read_text())[:2]
    for c in caps:
        text = c["conversations"][1]["value"]
        ids = a.text.encode(text)
        rows.append({"input": text, "modality": "text", "tokens": len(ids), "first_ids": ids[:8],
                     "roundtrip": a.text.decode(ids) == text})
    for r in rows:
        log(f"  {r['modality']:5s} {r['tokens']:4d} tokens  {r['input']}")
    (out / "samples.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = "".join(f"<tr><td>{r['modality']}</td><td>{html.escape(str(r['input']))}</td><td>{r['tokens']}</td>"
                    f"<td>{r['first_ids']}</td></tr>" for r in rows)
    media = report.media_block(sorted(out.glob("*.input.*")) + sorted(out.glob("*.decoded.*")))
    return {"pass": all(r.get("roundtrip", True) for r in rows), "token_space_hash": ts.hash,
            "total_ids": ts.total, "samples": len(rows),
            "_html": f"<pre>{html.escape(ts.table())}</pre><table><tr><th>modality</th><th>input</th><th>tokens</th>"
                     f"<th>first ids</th></tr>{table}</table><p>Real inputs and their decodes (tiny random codecs):</p>{media}"}


def stage_audit(cfg: LumoConfig, out: Path, log) -> dict:
    from ...eval.audit import run_audit
    rep = run_audit(cfg, out, write_baseline=True, log=log)
    failed = [k for k, v in rep["checks"].items() if not v]
    checks = "".join(f"<li>{'PASS' if v else 'FAIL'} {html.escape(k)}</li>" for k, v in rep["checks"].items())
    snr = {k.split("/")[-1][:14]: v["snr_db"] for k, v in rep["per_input"].items() if v.get("snr_db") is not None}
    return {"pass": rep["pass"], "failed_checks": failed,
            **{k: round(v, 4) for k, v in rep["metrics"].items() if v is not None},
            "_html": f"<ul>{checks}</ul>" + report.bar_chart("audio SNR per input, tiny codec", snr, width=640, unit="SNR (dB)")}


def stage_data(cfg: LumoConfig, out: Path, log, address: str | None) -> dict:
    """synth -> normalize (images, audio) -> one manifest -> tokenize -> verify."""
    from pipelines.normalize import run_normalize
    from pipelines.tokenize import run_tokenize
    from pipelines.verify import run_verify

    from ...data.manifest import read_manifest, write_manifest
    from ...data.synth import write_synth
    write_synth(out / "synth", cfg.demo.images, cfg.demo.audio, seed=cfg.demo.seed)
    recs = []
    for src in ("llava_pretrain", "audiocaps"):
        run_normalize(src, out / "synth" / src, out / f"normalize_{src}", cfg.data.normalize, address)
        recs += read_manifest(out / f"normalize_{src}" / "manifest.jsonl")[0]
    write_manifest(recs, out / "manifest.jsonl")
    summary = run_tokenize(out / "manifest.jsonl", cfg, out / "shards", address=address, log=log)
    rep = run_verify(out / "shards", cfg, out / "verify", write_baseline=True, address=address, log=log)
    for k, v in rep["checks"].items():
        log(f"  {'PASS' if v['pass'] else 'FAIL'}  {k}: {v['summary']}")
    lengths: dict[str, list[int]] = {}
    for split in ("train", "eval"):
        for smp in ShardDataset(out / "shards", split, shuffle=False):
            for k, v in smp["json"]["lengths"].items():
                lengths.setdefault(k, []).append(v)
    checks = "".join(f"<li>{'PASS' if v['pass'] else 'FAIL'} {html.escape(k)}: {html.escape(v['summary'])}</li>"
                     for k, v in rep["checks"].items())
    hists = "".join(report.histogram(f"{k} tokens per sample", v) for k, v in sorted(lengths.items()))
    return {"pass": rep["pass"], "records": summary["samples"], "errors": summary["errors"],
            "shards": rep["shards"], "retokenized": rep["checks"]["retokenize"].get("n"),
            "_html": f"<ul>{checks}</ul>{hists}"}


def stage_vlm(cfg: LumoConfig, out: Path, log, address: str | None) -> dict:
    """Stage 1/1.1: align the tiny VLM on synthetic shapes (2 CPU DDP workers) and run the visual-token ablation."""
    from ...data.synth import write_synth
    from .vlm import run_vlm_demo
    write_synth(out / "synth", cfg.demo.vlm_images, 0, seed=cfg.demo.seed)
    res = run_vlm_demo(out, out / "synth" / "llava_pretrain", log=log, address=address)
    m = res["metrics"]
    curves = {}
    mpath = Path(res["run_dir"]) / "metrics.json"
    if mpath.exists():
        mj = json.loads(mpath.read_text())
        curves["train loss"] = [(h["step"], h["loss"]) for h in mj.get("steps", [])]
        curves["eval loss"] = [(e["step"], e["loss"]) for e in mj.get("evals", []) if e.get("loss") is not None]
    return {"pass": res["pass"], "eval_loss": _r(m.get("eval_loss")), "steps": m.get("steps"),
            **{f"loss_{k}": _r(v) for k, v in m["ablation_mean_loss"].items()},
            **{f"win_{k}": _r(v) for k, v in m["ablation_win_rate"].items()},
            "_html": report.line_chart("VLM loss", curves, ylabel="nats per caption token") +
            report.bar_chart("VLM ablation: mean caption loss", m["ablation_mean_loss"], unit="nats / token")}


def stage_lm(cfg: LumoConfig, out: Path, log, address: str | None, config: str | None = None,
             sets: list[str] | None = None) -> dict:
    """Stage 0 + 3.3: base LM, token LM warm start (new_rows), modality ablation, text invariance, prompt study.
    The demo's training budget (lm.DEMO_TRAINING) applies on top of `config`; `sets` (--set) win."""
    from .lm import build_synth_shards, run_lm_demo
    shards, manifest, lcfg = build_synth_shards(out / "data", cfg.demo.lm_images, cfg.demo.lm_audio,
                                                seed=cfg.demo.seed, config=config, overrides=sets, log=log)
    res = run_lm_demo(out, shards, manifest, lcfg, log=log)
    st = res["stages"]
    flat = {f"{k}_pass": v["pass"] for k, v in st.items()}
    bars = {}
    for m, r in st.get("modality_ablation", {}).items():
        if isinstance(r, dict):
            bars.update({f"{m} {k}": v.get("gap", v.get("mean_gap")) for k, v in r.items()
                         if isinstance(v, dict) and isinstance(v.get("gap", v.get("mean_gap")), (int, float))})
    # the verdicts are the gate table above this section (eval/gate_rows.py); the chart shows the gaps
    return {"pass": res["pass"], **flat, "_run": str(out / "token_lm"), "_shards": str(shards),
            "_base": str(out / "lm" / "export"),
            "_html": report.bar_chart("3.3 modality ablation: caption-loss gap per condition", bars, width=640,
                                      unit="nats per caption token")}


def stage_mmpt(cfg: LumoConfig, out: Path, log, address: str | None, init_run: str, shards: str, base: str,
               config: str | None = None, sets: list[str] | None = None) -> dict:
    """Stage 4: any-to-any training from the stage-3.3 run (2 DDP workers), golden generations at every
    checkpoint, the modality ablation (reading still works) and generation fidelity on the stage-4 run."""
    from .lm import DEMO_DATA
    from .mmpt import mmpt_demo_config, run_mmpt_demo
    from ...eval.golden import golden_html
    mcfg = mmpt_demo_config(DEMO_DATA, config, sets)
    res = run_mmpt_demo(out, Path(shards), Path(init_run), Path(base), mcfg, log=log, address=address)
    st = res["stages"]
    tr = st.get("train", {})
    curves: dict[str, list] = {}
    for e in tr.get("evals", []):
        for k, v in e.items():
            if k.startswith("eval_") and k != "eval_loss":
                curves.setdefault(f"eval {k[5:]}", []).append((e["step"], v))
    losses = "".join(f"<tr><td>{t}</td><td>{tr.get('train', {}).get(t, '-')}</td><td>{v}</td></tr>"
                     for t, v in tr.get("eval", {}).items())
    fid = st.get("fidelity", {}).get("attributes", {})
    fid_rows = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_r(v.get(c), 3)}</td>" for c in ("chance", "ceiling", "generated", "swapped"))
        + f"<td>{'gated: ' + ('PASS' if v.get('pass') else 'FAIL') if v.get('gated') else 'reported'}</td></tr>"
        for k, v in fid.items())
    grids = "".join(golden_html(out / "mmpt" / g, f"golden generations, {g.split('/')[-1].replace('_', ' ')}")
                    for g in tr.get("golden", [])[-2:])
    verdicts = "".join(f"<li>{'PASS' if v['pass'] else 'FAIL'} {html.escape(k)}"
                       + (f": {html.escape(v['error'])}" if "error" in v else "") + "</li>" for k, v in st.items())
    return {"pass": res["pass"], **{f"{k}_pass": v["pass"] for k, v in st.items()},
            "_run": res["run"], "_shards": shards,
            "_html": f"<ul>{verdicts}</ul><p>Text invariance does not apply: stage 4 trains beyond the new rows "
                     f"(freeze={mcfg.token_lm.freeze}), so text logits change by design.</p>"
                     f"<table><tr><th>task</th><th>train loss (last interval)</th><th>eval loss</th></tr>{losses}</table>"
                     + report.line_chart("stage-4 eval loss per task", curves, ylabel="nats per target token")
                     + (f"<table><tr><th>attribute</th><th>chance</th><th>real eval (ceiling)</th><th>generated</th>"
                        f"<th>swapped caption</th><th>verdict</th></tr>{fid_rows}</table>" if fid_rows else "")
                     + grids}


# The generate stage's captions: two per media task, in the synthetic set's caption grammar.
GENERATE_PROMPTS = (("t2i", "two red circles on the left"), ("t2i", "one blue square in the center"),
                    ("t2a", "three short high beeps"), ("t2a", "one long low beep"))


def stage_generate(cfg: LumoConfig, out: Path, log, run_dir: str, shards: str) -> dict:
    """Stage 3.4 on the stage-4 run: constrained generation, the decode-compliance and prompt-ablation gates."""
    from ...eval.gates import run_decode_gate, run_prompt_gate
    from ...generate import generate, load_run
    run = load_run(run_dir)
    files, captions = [], []
    for task, prompt in GENERATE_PROMPTS:
        rows = generate(run, task, out / task / prompt.replace(" ", "_"), prompt=prompt, n=2, log=log)
        for i, r in enumerate(rows, 1):
            if r.get("file"):
                files.append(Path(r["file"]))
                captions.append(f"{task}: {prompt} (sample {i})")
    dec = run_decode_gate(run, out / "gate_decode", n=cfg.demo.gate_n, log=log)
    pr = run_prompt_gate(run, out / "gate_prompts", shards=shards, log=log)
    rows = "".join(f"<tr><td>{t}</td><td>{r['n']}</td><td>{_r(r.get('swapped', {}).get('win'), 2)}</td>"
                   f"<td>{_r(r.get('empty', {}).get('win'), 2)}</td><td>{'PASS' if r['pass'] else 'FAIL'}</td></tr>"
                   for t, r in pr["tasks"].items())
    return {"pass": dec["pass"] and pr["pass"], "decode_gate": dec["pass"], "prompt_gate": pr["pass"],
            **{f"{t}_win_swapped": _r(r.get("swapped", {}).get("win"), 3) for t, r in pr["tasks"].items()},
            "_html": f"<p>decode compliance {'PASS' if dec['pass'] else 'FAIL'} ({cfg.demo.gate_n} golden prompts per task); "
                     f"prompt ablation {'PASS' if pr['pass'] else 'FAIL'} (win rate of the true caption's target loss: "
                     f"&ge; {pr['thresholds']['win_swapped']} vs a swapped caption, &ge; {pr['thresholds']['win_empty']} vs none)</p>"
                     f"<table><tr><th>task</th><th>n</th><th>win vs swapped</th><th>win vs empty</th><th>verdict</th></tr>{rows}</table>"
                     "<p>Generated by the stage-4 run for fixed captions, two samples each (the captions name what "
                     "a trained run draws: colour, shape, count and place; beep count, length and pitch):</p>"
                     f'<div class="gen-grid">{report.media_block(files, captions)}</div>'}


def _needs(ctx: dict, stage: str, *keys: str) -> list:
    if stage not in ctx or any(k not in ctx[stage] for k in keys):
        raise RuntimeError(f"this stage needs the results of the '{stage}' stage, which did not run or failed")
    return [ctx[stage][k] for k in keys]


def _r(v, n: int = 4):
    return round(v, n) if isinstance(v, float) else v


def run_demo(cfg: LumoConfig, out: Path, address: str | None = None, log=print, config: str | None = None,
             sets: list[str] | None = None) -> int:
    """`lumo demo`. cfg: the loaded config; config / sets: the --config file and --set items it came
    from, which the lm stage re-applies over its own training budget."""
    out = Path(out).resolve()  # Ray workers do not share the driver's working directory
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out)
    stages: list[tuple[str, Callable[[Path], dict]]] = [
        ("uti", lambda d: stage_uti(cfg, d, log)),
        ("audit", lambda d: stage_audit(cfg, d, log)),
        ("data", lambda d: stage_data(cfg, d, log, address)),
        ("vlm", lambda d: stage_vlm(cfg, d, log, address)),
        ("lm", lambda d: stage_lm(cfg, d, log, address, config, sets)),
        ("mmpt", lambda d: stage_mmpt(cfg, d, log, address, *_needs(ctx, "lm", "_run", "_shards", "_base"),
                                      config=config, sets=sets)),
        ("generate", lambda d: stage_generate(cfg, d, log, *_needs(ctx, "mmpt", "_run", "_shards"))),
    ]
    ctx: dict[str, dict] = {}
    unknown = set(cfg.demo.skip) - {n for n, _ in stages}
    if unknown:
        raise ValueError(f"demo.skip names unknown stages {sorted(unknown)}; stages: {[n for n, _ in stages]}")
    stages = [(n, f) for n, f in stages if n not in cfg.demo.skip]
    rows, sections, gates, t_all = [], [], [], time.time()
    for i, (name, fn) in enumerate(stages, 1):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        log(f"\n=== [{i}/{len(stages)}] {name} ===")
        t0 = time.time()
        try:
            res = fn(d)
        except Exception as e:  # a crashed stage is a failed stage; the rest still runs
            res = {"pass": False, "error": f"{type(e).__name__}: {e}"}
        res.update(stage=name, seconds=round(time.time() - t0, 1), dir=str(d))
        sections.append((name, res.pop("_html", "")))
        try:  # every gate's statistic, threshold and verdict, read back from the reports the stage wrote
            gates += [{"stage": name, **g} for g in stage_gates(name, d)]
        except Exception as e:  # a report that does not parse must not hide the stage's own verdict
            gates.append({"stage": name, "gate": "report", "statistic": f"{type(e).__name__}: {e}"[:200],
                          "threshold": "-", "pass": False, "meaning": "the stage's reports could not be read", "link": ""})
        ctx[name] = {k: res.pop(k) for k in [k for k in res if k.startswith("_")]}
        rows.append(res)
        log(f"=== {name}: {'PASS' if res['pass'] else 'FAIL'} ({res['seconds']}s) ===")
        (out / "summary.json").write_text(json.dumps({"stages": rows, "gates": gates}, indent=2, default=str) + "\n")
    page = report.write_report(out, "lumo demo", rows, sections, gates, LOOK_AT)
    log(f"\nlumo demo finished in {time.time() - t_all:.0f}s -> {out}  (report: {page})")
    for r in rows:
        extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("stage", "pass", "seconds", "dir"))
        log(f"  {'PASS' if r['pass'] else 'FAIL'}  {r['stage']:6s} {r['seconds']:6.1f}s  {r['dir']}  {extra}")
    return 0 if all(r["pass"] for r in rows) else 1
