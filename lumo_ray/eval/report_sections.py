"""The demo report's section per stage, built from the files the stage wrote in its folder (as
gate_rows reads the gates back), so a stage returns data and report.html can be rebuilt from a run.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from . import report


def _reported(v: dict) -> str:
    """A reported attribute's verdict cell: its probe may not read it (then its numbers judge the probe)."""
    return "reported" if v.get("probe_reads", True) else "reported; the probe cannot read it"


def _load(p: Path) -> Any:
    return json.loads(p.read_text()) if p.exists() else None


def _r(v, n: int = 3):
    return round(v, n) if isinstance(v, float) else v


def _mark(ok: Any) -> str:
    return "PASS" if ok else "FAIL"


def uti_section(d: Path) -> str:
    from ..token_space import TokenSpace

    rows = _load(d / "samples.json") or []
    table = "".join(f"<tr><td>{r['modality']}</td><td>{html.escape(str(r['input']))}</td><td>{r['tokens']}</td>"
                    f"<td>{r['first_ids']}</td></tr>" for r in rows)
    layout = ""
    if (d / "token_space.json").exists():  # the id ranges per modality, as `lumo uti build` prints them
        ts = TokenSpace.load(d / "token_space.json")
        layout = ("<table><tr><th>id range</th><th>first id</th><th>last id</th><th>size (ids)</th></tr>"
                  + "".join(f"<tr><td>{html.escape(r.name)}</td><td>{r.start}</td><td>{r.end}</td><td>{r.size}</td></tr>"
                            for r in ts.ranges)
                  + f"<tr><td>total</td><td></td><td></td><td>{ts.total}</td></tr>"
                  + f"<tr><td>padded</td><td></td><td></td><td>{ts.padded_size}</td></tr></table>"
                  + report.labelled_table([("token space hash", f"{ts.hash} (sha256)")]))
    media = report.media_block(sorted(d.glob("*.input.*")) + sorted(d.glob("*.decoded.*")))
    return (f"{layout}<p>Real samples tokenized:</p><table><tr><th>modality</th><th>input</th><th>tokens</th>"
            f"<th>first ids</th></tr>{table}</table><p>Real inputs and their decodes (tiny codecs):</p>{media}")


def audit_section(d: Path) -> str:
    rep = _load(d / "report.json") or {"checks": {}, "per_input": {}}
    checks = "".join(f"<li>{_mark(v)} {html.escape(k)}</li>" for k, v in rep["checks"].items())
    snr = {k.split("/")[-1][:14]: v["snr_db"] for k, v in rep["per_input"].items() if v.get("snr_db") is not None}
    return f"<ul>{checks}</ul>" + report.bar_chart("audio SNR per input, tiny codec", snr, width=640, unit="SNR (dB)")


def data_section(d: Path) -> str:
    from ..data.shard_reader import ShardDataset

    rep = _load(d / "verify" / "report.json") or {"checks": {}}
    checks = "".join(f"<li>{_mark(v['pass'])} {html.escape(k)}: {html.escape(v['summary'])}</li>"
                     for k, v in rep["checks"].items())
    lengths: dict[str, list[int]] = {}
    if (d / "shards" / "index.json").exists():
        for split in ("train", "eval"):
            for smp in ShardDataset(d / "shards", split, shuffle=False):
                for k, v in smp["json"]["lengths"].items():
                    lengths.setdefault(k, []).append(v)
    hists = "".join(report.histogram(f"{k} tokens per sample", v) for k, v in sorted(lengths.items()))
    return f"<ul>{checks}</ul>{hists}"


def vlm_section(d: Path) -> str:
    mj = _load(d / "vlm_run" / "metrics.json") or {}
    curves = {"train loss": [(h["step"], h["loss"]) for h in mj.get("steps", [])],
              "eval loss": [(e["step"], e["loss"]) for e in mj.get("evals", []) if e.get("loss") is not None]}
    mean = (_load(d / "vlm_ablation" / "ablation.json") or {}).get("mean_loss", {})
    order = ["correct", "shuffled", "zero", "noise"]  # the ablation's order: the image, then ever less of it
    bars = {k: mean[k] for k in sorted(mean, key=lambda k: (order.index(k) if k in order else len(order), k))}
    return (report.line_chart("VLM loss", curves, ylabel="nats per caption token")
            + report.bar_chart("VLM ablation: mean caption loss", bars, unit="nats / token"))


def lm_section(d: Path) -> str:
    st = (_load(d / "lm_demo.json") or {}).get("stages", {})
    bars = {}
    for m, r in st.get("modality_ablation", {}).items():
        if isinstance(r, dict):
            bars.update({f"{m} {k}": v.get("gap", v.get("mean_gap")) for k, v in r.items()
                         if isinstance(v, dict) and isinstance(v.get("gap", v.get("mean_gap")), (int, float))})
    # the verdicts are the gate table above the sections (eval/gate_rows.py); the chart shows the gaps
    return report.bar_chart("3.3 modality ablation: caption-loss gap per condition", bars, width=640,
                            unit="nats per caption token")


def mmpt_section(d: Path) -> str:
    import yaml

    from .golden import golden_html

    st = (_load(d / "mmpt_demo.json") or {}).get("stages", {})
    tr = st.get("train", {})
    curves: dict[str, list] = {}
    for e in tr.get("evals", []):
        for k, v in e.items():
            if k.startswith("eval_") and k != "eval_loss":
                curves.setdefault(f"eval {k[5:]}", []).append((e["step"], v))
    losses = "".join(f"<tr><td>{t}</td><td>{tr.get('train', {}).get(t, '-')}</td><td>{v}</td></tr>"
                     for t, v in tr.get("eval", {}).items())
    fid_rows = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_r(v.get(c))}</td>" for c in ("chance", "ceiling", "generated", "swapped"))
        + f"<td>{'gated: ' + _mark(v.get('pass')) if v.get('gated') else _reported(v)}</td></tr>"
        for k, v in st.get("fidelity", {}).get("attributes", {}).items())
    grids = "".join(golden_html(d / "mmpt" / g, f"golden generations, {g.split('/')[-1].replace('_', ' ')}")
                    for g in tr.get("golden", [])[-2:])
    verdicts = "".join(f"<li>{_mark(v['pass'])} {html.escape(k)}" + (f": {html.escape(v['error'])}" if "error" in v else "")
                       + "</li>" for k, v in st.items())
    cfg = yaml.safe_load((d / "mmpt" / "config.yaml").read_text()) if (d / "mmpt" / "config.yaml").exists() else {}
    freeze = (cfg or {}).get("token_lm", {}).get("freeze", "?")
    return (f"<ul>{verdicts}</ul><p>Text invariance does not apply: stage 4 trains beyond the new rows "
            f"(freeze={html.escape(str(freeze))}), so text logits change by design.</p>"
            f"<table><tr><th>task</th><th>train loss (last interval)</th><th>eval loss</th></tr>{losses}</table>"
            + report.line_chart("stage-4 eval loss per task", curves, ylabel="nats per target token")
            + (f"<table><tr><th>attribute</th><th>chance</th><th>real eval (ceiling)</th><th>generated</th>"
               f"<th>swapped caption</th><th>verdict</th></tr>{fid_rows}</table>" if fid_rows else "")
            + generations_section(d / "fidelity") + captions_section(d / "fidelity") + grids)


def _read(read: Any) -> str:
    return ", ".join(f"{a} {v}" for a, v in read.items()) if read else "(outside the grammar)"


def generations_section(d: Path) -> str:
    """The fidelity gate's first generated samples (t2i / t2a) from a fidelity report folder: the prompt, the
    generated image or clip, what the attribute probe read in it and, per attribute, right or wrong."""
    from .captions import parse_caption

    rep = _load(d / "report.json") or {}
    out = []
    for m, rows in (rep.get("samples") or {}).items():
        ex = []
        for s in rows:
            if not s.get("file") or not (d / s["file"]).exists():  # a generation that did not decode: wrong
                ex.append(f"<tr><td>{html.escape(s['caption'])}</td><td>did not decode: "
                          f"{html.escape(str(s.get('error') or 'no file'))}</td><td>-</td><td>every attribute WRONG</td></tr>")
                continue
            want = parse_caption(m, s["caption"], s["id"])
            marks = ", ".join(f"{a} {'right' if str(v) == str(want[a]) else 'WRONG'}" for a, v in s["read"].items())
            ex.append(f"<tr><td>{html.escape(s['caption'])}</td><td>{report.media_block([d / s['file']], [s['id']])}</td>"
                      f"<td>{html.escape(_read(s['read']))}</td><td>{marks}</td></tr>")
        if ex:
            task = {"image": "t2i", "audio": "t2a"}.get(m, m)
            out.append(f"<p>{task} examples: the prompt, what the stage-4 run generated for it (decoded by the "
                       "codec), what the attribute probe read in it and whether each attribute is right:</p><table>"
                       f"<tr><th>prompt</th><th>generated ({task})</th><th>the probe read</th><th>right or wrong</th>"
                       f"</tr>{''.join(ex)}</table>")
    return "".join(out)


def captions_section(d: Path) -> str:
    """Caption accuracy (i2t / a2t) and the field's metrics from a fidelity report folder: per attribute the
    accuracies and verdict, a few inputs with their generated and reference captions, what the parser read
    and which attributes are right; then the metrics table."""
    rep = _load(d / "report.json") or {}
    caps, field = rep.get("captions") or {}, rep.get("field_metrics") or {}
    if not caps and not field:
        return ""
    out = []
    if caps:
        gating = any(c.get("gating") for c in caps.values())
        rows = "".join(
            f"<tr><td>{c['task']}</td><td>{html.escape(a)}</td><td>{c['n']}</td><td>{c['unparseable']}</td>"
            + "".join(f"<td>{_r(x.get(k))}</td>" for k in ("chance", "generated", "swapped"))
            + f"<td>{x['paired']['p']:.2g}</td><td>{_mark(x['pass'])}{'' if gating else ' (reported)'}"
            + (f": {html.escape(x['reason'])}" if x.get("reason") else "") + "</td></tr>"
            for c in caps.values() for a, x in c["attributes"].items())
        out.append(f"<h3>Caption accuracy (i2t / a2t): {'gated' if gating else 'reported, not gated'}</h3>"
                   "<p>The stage-4 run captions the fidelity eval samples; each caption is parsed with the synthetic "
                   "grammar and scored per attribute against its input's attributes (generated) and another "
                   "sample's (swapped: the floor of a model that ignores its input); ceiling 1; a caption outside "
                   "the grammar is wrong on every attribute.</p><table><tr><th>task</th><th>attribute</th><th>n</th>"
                   "<th>unparseable</th><th>chance</th><th>generated</th><th>swapped</th><th>p</th><th>verdict</th>"
                   f"</tr>{rows}</table>")
        for c in caps.values():
            ex = []
            for s in c.get("samples", []):
                if not s.get("file") or not (d / s["file"]).exists():
                    continue
                marks = ", ".join(f"{a} {'right' if ok else 'WRONG'}" for a, ok in s["right"].items())
                ex.append(f"<tr><td>{report.media_block([d / s['file']], [s['id']])}</td>"
                          f"<td>{html.escape(str(s['generated']))}</td><td>{html.escape(s['reference'])}</td>"
                          f"<td>{html.escape(_read(s['read']))}</td><td>{marks}</td></tr>")
            if ex:
                out.append(f"<p>{c['task']} examples: the input as the codec decodes the codes the model read, its "
                           "generated and reference captions, what the parser read and whether each attribute is right"
                           f":</p><table><tr><th>input ({c['task']})</th><th>generated caption</th><th>reference caption"
                           f"</th><th>the parser read</th><th>right or wrong</th></tr>{''.join(ex)}</table>")
    if field:
        def cells(f: dict) -> list:
            c = f.get("clipscore", {})
            return [f.get("n"), f.get("bleu4"), f.get("cider_d"), c.get("generated"), c.get("generated_swapped_caption"),
                    c.get("real"), f.get("frechet_clip")]

        rows = "".join(f"<tr><td>{t}</td>" + "".join(f"<td>{'-' if v is None else _r(v)}</td>" for v in cells(f))
                       + "</tr>" for t, f in field.items())
        clip = next((f["clip"] for f in field.values() if "clip" in f), "")
        out.append("<h3>The field's metrics (reported, not gated)</h3><p>BLEU-4 and CIDEr-D of the captions against "
                   "the reference captions (as the COCO caption evaluation computes them); CLIPScore = 100 x mean "
                   "max(cos(image, caption), 0) of the t2i images with their own caption, with a swapped sample's "
                   "caption, and of the real images; the Fréchet distance between the CLIP image features of "
                   f"generated and real images ({html.escape(clip)} CLIP).</p><table><tr><th>task</th><th>n</th>"
                   "<th>BLEU-4</th><th>CIDEr-D</th><th>CLIPScore</th><th>CLIPScore, swapped caption</th>"
                   f"<th>CLIPScore, real images</th><th>Fréchet CLIP distance</th></tr>{rows}</table>")
    return "".join(out)


def generate_section(d: Path) -> str:
    dec, pr = _load(d / "gate_decode" / "report.json"), _load(d / "gate_prompts" / "report.json")
    if dec is None and pr is None:  # the stage failed before its gates ran: its error is in the stage table
        return ""
    dec, pr = dec or {}, pr or {"tasks": {}, "thresholds": {}}
    thr = pr["thresholds"]
    rows = "".join(f"<tr><td>{t}</td><td>{r['n']}</td><td>{_r(r.get('swapped', {}).get('win'), 2)}</td>"
                   f"<td>{_r(r.get('empty', {}).get('win'), 2)}</td><td>{_mark(r['pass'])}</td></tr>"
                   for t, r in pr["tasks"].items())
    files, captions = [], []
    for g in sorted(d.glob("t2*/*/generations.jsonl"), key=lambda g: (g.parts[-3] != "t2i", g)):  # images first
        for r in map(json.loads, g.read_text().splitlines()):
            if r.get("file"):
                files.append(g.parent / Path(r["file"]).name)
                captions.append(f"{r['task']}: {r['prompt']} (sample {r['index'] + 1})")
    return (report.labelled_table([
                ("decode compliance", f"{_mark(dec.get('pass'))} ({dec.get('n', '?')} golden prompts per task)"),
                ("prompt ablation", f"{_mark(pr.get('pass'))} (win rate of the true caption's target loss: "
                                    f"\u2265 {thr.get('win_swapped')} vs a swapped caption, \u2265 {thr.get('win_empty')} vs none)")])
            + f"<table><tr><th>task</th><th>n</th><th>win vs swapped</th><th>win vs empty</th><th>verdict</th></tr>{rows}</table>"
            "<p>Generated by the stage-4 run for fixed captions, two samples each (the captions name what "
            "a trained run draws: colour, shape, count and place; beep count, length and pitch):</p>"
            f'<div class="gen-grid">{report.media_block(files, captions)}</div>')


# The stage table's numbers (the rows cli/demo/run.py's stages return): key -> (name, unit).
NUMBERS = {
    "token_space_hash": ("token space hash", "(sha256)"), "total_ids": ("ids in the token space", "ids"),
    "samples": ("real samples tokenized and decoded", "samples"), "failed_checks": ("failed checks", ""),
    "records": ("records tokenized", "records"), "errors": ("records that failed", "records"),
    "shards": ("shards written", "shards"), "retokenized": ("samples re-tokenized by verify", "samples"),
    "eval_loss": ("eval loss", "nats / caption token"), "steps": ("training steps", "steps"),
    "decode_gate": ("decode-compliance gate", ""), "prompt_gate": ("prompt-ablation gate", ""),
}
_AUDIT = {"snr_db": ("SNR", "dB"), "log_mel_l1": ("log-mel L1", "(log-mel units)"), "psnr": ("PSNR", "dB"),
          "ssim": ("SSIM", "(0-1)")}


def number_label(key: str) -> tuple[str, str]:
    """The stage table's name and unit of one of a stage's numbers (the key itself where none is known)."""
    if key in NUMBERS:
        return NUMBERS[key]
    m = re.fullmatch(r"(audio|image)(?:_(real|synth))?_(snr_db|log_mel_l1|psnr|ssim)", key)  # the audit's metrics
    if m:
        name, unit = _AUDIT[m[3]]
        return f"{m[1]} {name}, {m[2] or 'all'} inputs", unit
    if key.startswith("loss_"):  # the VLM ablation
        return f"mean caption loss, {key[5:]} images", "nats / token"
    if key.startswith("win_"):
        return f"win rate of the correct image vs {key[4:]}", "(0-1)"
    if key.endswith("_win_swapped"):
        return f"{key[:-12]}: win rate vs a swapped caption", "(0-1)"
    if key.endswith("_pass"):
        return key[:-5].replace("_", " "), ""
    return key.replace("_", " "), ""


SECTIONS = {"uti": uti_section, "audit": audit_section, "data": data_section, "vlm": vlm_section,
            "lm": lm_section, "mmpt": mmpt_section, "generate": generate_section}


def stage_section(stage: str, d: Path) -> str:
    """The HTML of one stage's section, from its folder; a stage without a builder has none."""
    fn = SECTIONS.get(stage)
    return fn(Path(d)) if fn else ""
