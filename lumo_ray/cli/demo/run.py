"""`lumo demo`: the whole program on the embedded tiny default, offline, stage by stage.

Each stage prints progress, writes into its own folder under the demo directory, and adds a row
(name, pass, seconds, key numbers, folder) to `summary.json`. The demo exits non-zero when a gate fails;
summary.json and report.html open with where the run came from (eval/run_header.py), exit code included.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from PIL import Image

from ...config import ConfigError, LumoConfig, dump_config
from ...eval import report, run_header
from ...eval.gate_rows import LOOK_AT, stage_gates
from ...eval.report_sections import number_label, stage_section
from ...runtime import elapsed, heartbeat, start_clock, torch_threads
from ...storage import write_file


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
    write_file(out / "samples.json", json.dumps(rows, indent=2) + "\n")
    return {"pass": all(r.get("roundtrip", True) for r in rows), "token_space_hash": ts.hash,
            "total_ids": ts.total, "samples": len(rows)}


def stage_audit(cfg: LumoConfig, out: Path, log) -> dict:
    from ...eval.audit import run_audit
    rep = run_audit(cfg, out, write_baseline=True, log=log)
    failed = [k for k, v in rep["checks"].items() if not v]
    return {"pass": rep["pass"], "failed_checks": failed,
            **{k: round(v, 4) for k, v in rep["metrics"].items() if v is not None}}


def stage_data(cfg: LumoConfig, out: Path, log, address: str | None) -> dict:
    """synth -> normalize (images, audio) -> one manifest -> tokenize -> verify."""
    from pipelines.synth_shards import synth_to_shards
    from pipelines.verify import run_verify

    shards, _, summary = synth_to_shards(out, cfg.demo.images, cfg.demo.audio, cfg.demo.seed, cfg, address, log)
    rep = run_verify(shards, cfg, out / "verify", write_baseline=True, address=address, log=log)
    for k, v in rep["checks"].items():
        log(f"  {'PASS' if v['pass'] else 'FAIL'}  {k}: {v['summary']}")
    return {"pass": rep["pass"], "records": summary["samples"], "errors": summary["errors"],
            "shards": rep["shards"], "retokenized": rep["checks"]["retokenize"].get("n")}


def stage_vlm(cfg: LumoConfig, out: Path, log, address: str | None) -> dict:
    """Stage 1/1.1: align the tiny VLM on synthetic shapes (2 CPU DDP workers) and run the visual-token ablation."""
    from ...data.synth import write_synth
    from .vlm import run_vlm_demo
    write_synth(out / "synth", cfg.demo.vlm_images, 0, seed=cfg.demo.seed)
    res = run_vlm_demo(out, out / "synth" / "llava_pretrain", log=log, address=address)
    m = res["metrics"]
    return {"pass": res["pass"], "eval_loss": _r(m.get("eval_loss")), "steps": m.get("steps"),
            **{f"loss_{k}": _r(v) for k, v in m["ablation_mean_loss"].items()},
            **{f"win_{k}": _r(v) for k, v in m["ablation_win_rate"].items()}}


def stage_lm(cfg: LumoConfig, out: Path, log, address: str | None, config: str | None = None,
             sets: list[str] | None = None) -> dict:
    """Stage 0 + 3.3: base LM, token LM warm start (new_rows), modality ablation, text invariance, prompt study.
    The demo's recipes (config/recipes.py) apply on top of `config`; `sets` (--set) win."""
    from pipelines.synth_shards import build_synth_shards

    from .lm import run_lm_demo
    shards, manifest, lcfg = build_synth_shards(out / "data", cfg.demo.lm_images, cfg.demo.lm_audio,
                                                seed=cfg.demo.seed, config=config, overrides=sets, log=log)
    res = run_lm_demo(out, shards, manifest, lcfg, log=log)
    st = res["stages"]
    return {"pass": res["pass"], **{f"{k}_pass": v["pass"] for k, v in st.items()}, "_run": str(out / "token_lm"),
            "_shards": str(shards), "_base": str(out / "lm" / "export")}


def stage_mmpt(cfg: LumoConfig, out: Path, log, address: str | None, init_run: str, shards: str, base: str,
               config: str | None = None, sets: list[str] | None = None) -> dict:
    """Stage 4: any-to-any training from the stage-3.3 run (2 DDP workers), golden generations at every
    checkpoint, the modality ablation (reading still works) and generation fidelity on the stage-4 run."""
    from ...config.recipes import DEMO_DATA
    from .mmpt import mmpt_demo_config, run_mmpt_demo
    mcfg = mmpt_demo_config(DEMO_DATA, config, sets)
    res = run_mmpt_demo(out, Path(shards), Path(init_run), Path(base), mcfg, log=log, address=address)
    return {"pass": res["pass"], **{f"{k}_pass": v["pass"] for k, v in res["stages"].items()},
            "_run": res["run"], "_shards": shards}


# The generate stage's captions: two per media task, in the synthetic set's caption grammar.
GENERATE_PROMPTS = (("t2i", "two red circles on the left"), ("t2i", "one blue square in the center"),
                    ("t2a", "three short high beeps"), ("t2a", "one long low beep"))


def stage_generate(cfg: LumoConfig, out: Path, log, run_dir: str, shards: str) -> dict:
    """Stage 3.4 on the stage-4 run: constrained generation, the decode-compliance and prompt-ablation gates."""
    from ...eval.gates import run_decode_gate, run_prompt_gate
    from ...generate import generate, load_run
    run = load_run(run_dir)
    for task, prompt in GENERATE_PROMPTS:
        generate(run, task, out / task / prompt.replace(" ", "_"), prompt=prompt, n=2, log=log)
    dec = run_decode_gate(run, out / "gate_decode", n=cfg.demo.gate_n, log=log)
    pr = run_prompt_gate(run, out / "gate_prompts", shards=shards, log=log)
    return {"pass": dec["pass"] and pr["pass"], "decode_gate": dec["pass"], "prompt_gate": pr["pass"],
            **{f"{t}_win_swapped": _r(r.get("swapped", {}).get("win"), 3) for t, r in pr["tasks"].items()}}


def _needs(ctx: dict, stage: str, *keys: str) -> list:
    if stage not in ctx or any(k not in ctx[stage] for k in keys):
        raise RuntimeError(f"this stage needs the results of the '{stage}' stage, which did not run or failed")
    return [ctx[stage][k] for k in keys]


def _r(v, n: int = 4):
    return round(v, n) if isinstance(v, float) else v


def _write_results(out: Path, head: dict, rows: list, sections: list, gates: list, exit_code: int | None, log=print):
    """summary.json (header, stages, gates) and, once the exit code is known, report.html."""
    final = run_header.finish(head, exit_code)
    write_file(out / "summary.json", json.dumps({"header": final, "stages": rows, "gates": gates}, indent=2,
                                                default=str) + "\n")
    if exit_code is None:
        return None, final
    with heartbeat("writing report.html", log):
        return report.write_report(out, "lumo demo", rows, sections, gates, LOOK_AT, header=run_header.rows(final),
                                   label=number_label), final


def run_demo(cfg: LumoConfig, out: Path, address: str | None = None, log=print, config: str | None = None,
             sets: list[str] | None = None) -> int:
    """`lumo demo`. cfg: the loaded config; config / sets: the --config file and --set items it came
    from, which the lm stage re-applies over its own training budget. Returns the exit code, which
    summary.json's and report.html's header carry (also when the run is cut short: 130, or what `lumo`
    returns for the exception, written before it propagates)."""
    start_clock()  # every line that starts or ends a stage says how long the demo has run
    out = Path(out).resolve()  # Ray workers do not share the driver's working directory
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
    if unknown:  # before anything is written
        raise ConfigError(f"demo.skip names unknown stages {sorted(unknown)}; stages: {[n for n, _ in stages]}")
    stages = [(n, f) for n, f in stages if n not in cfg.demo.skip]
    out.mkdir(parents=True, exist_ok=True)
    head = run_header.start(dump_config(cfg, out), cfg.demo.seed)  # the digest is of the config.yaml written here
    rows, sections, gates = [], [], []
    i, name, t0, d = 0, "", time.time(), out
    try:
        for i, (name, fn) in enumerate(stages, 1):
            d = out / name
            d.mkdir(parents=True, exist_ok=True)
            log(f"\n=== [{i}/{len(stages)}] {name} ({elapsed()}) ===")
            t0 = time.time()
            try:
                with heartbeat(f"in stage {name}", log):  # a line at least every few seconds, whatever the stage waits on
                    res = fn(d)
            except Exception as e:  # a crashed stage is a failed stage; the rest still runs
                res = {"pass": False, "error": f"{type(e).__name__}: {e}"}
            res.update(stage=name, seconds=round(time.time() - t0, 1), dir=str(d))
            try:  # the section and every gate's statistic, threshold and verdict, read back from the stage's files
                sections.append((name, stage_section(name, d)))
                gates += [{"stage": name, **g} for g in stage_gates(name, d)]
            except Exception as e:  # a report that does not parse must not hide the stage's own verdict
                gates.append({"stage": name, "gate": "report", "statistic": f"{type(e).__name__}: {e}"[:200],
                              "threshold": "-", "pass": False, "meaning": "the stage's reports could not be read", "link": ""})
            ctx[name] = {k: res.pop(k) for k in [k for k in res if k.startswith("_")]}
            rows.append(res)
            log(f"=== {name}: {'PASS' if res['pass'] else 'FAIL'} in {res['seconds']} s ({elapsed()}) ===")
            _write_results(out, head, rows, sections, gates, None, log)
    except BaseException as e:  # cut short (Ctrl-C, a failure outside any stage): a report with the code lumo exits with
        code = run_header.exit_code_of(e)
        rows.append({"stage": name, "pass": False, "seconds": round(time.time() - t0, 1), "dir": str(d),
                     "error": f"cut short: {type(e).__name__}: {e}"} if len(rows) < i else
                    {"stage": "demo", "pass": False, "seconds": 0, "dir": str(out),
                     "error": f"{type(e).__name__}: {e}"})
        with contextlib.suppress(Exception):
            _write_results(out, head, rows, sections, gates, code, log)
        raise
    code = 0 if all(r["pass"] for r in rows) else 1
    page, final = _write_results(out, head, rows, sections, gates, code, log)
    log(f"\nlumo demo finished in {final['wall_s']:.0f}s with exit code {code} -> {out}  (report: {page})")
    for r in rows:
        extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("stage", "pass", "seconds", "dir"))
        log(f"  {'PASS' if r['pass'] else 'FAIL'}  {r['stage']:6s} {r['seconds']:6.1f}s  {r['dir']}  {extra}")
    return code
