"""A self-contained HTML report (no network): stage table, charts as inline SVG, media inlined as data URIs."""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Iterable

from ..storage import write_file

# Everything is inlined; the policy makes the browser refuse any fetch a section might add, so the
# report never touches the network (data: URIs for media, inline styles only, no scripts).
CSP = "default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'"
PALETTE = ["#3b6ea8", "#d9822b", "#3a9a5b", "#b5443a", "#7b5ea7", "#8c6d4f"]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".wav": "audio/wav", ".svg": "image/svg+xml"}[path.suffix.lower()]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _ylabel(text: str, height: int) -> str:
    return (f'<text transform="translate(10,{height / 2:.0f}) rotate(-90)" text-anchor="middle" font-size="10" '
            f'fill="#555">{html.escape(text)}</text>') if text else ""


def bar_chart(title: str, values: dict[str, float], width: int = 420, height: int = 200, unit: str = "") -> str:
    """Vertical bars from a zero line (negative values hang below it), with value labels.

    A missing or non-finite value (a NaN loss, an infinite SNR) keeps its label but draws no bar,
    so one bad number cannot break the scale of the others."""
    if not values:
        return ""
    finite = [v for v in values.values() if _finite(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    scale = (height - 60) / ((hi - lo) or 1.0)
    zero = 20 + hi * scale
    bw = (width - 40) / len(values)
    bars = []
    for i, (k, v) in enumerate(values.items()):
        if not _finite(v):
            bars.append(f'<text x="{30 + i * bw + bw / 2:.1f}" y="{height - 6}" text-anchor="middle" font-size="10">'
                        f'{html.escape(k)}</text><text x="{30 + i * bw + bw / 2:.1f}" y="{zero - 4:.1f}" '
                        f'text-anchor="middle" font-size="10">{html.escape(str(v))}</text>')
            continue
        x, top = 30 + i * bw, zero - max(v, 0) * scale
        bars.append(f'<rect x="{x + 4:.1f}" y="{top:.1f}" width="{bw - 8:.1f}" height="{abs(v) * scale:.1f}" '
                    f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{x + bw / 2:.1f}" y="{height - 6}" '
                    f'text-anchor="middle" font-size="10">{html.escape(k)}</text><text x="{x + bw / 2:.1f}" '
                    f'y="{top - 4 if v >= 0 else zero + abs(v) * scale + 12:.1f}" text-anchor="middle" '
                    f'font-size="10">{v:.3g}</text>')
    axis = (f'<line x1="28" x2="{width - 8}" y1="{zero:.1f}" y2="{zero:.1f}" stroke="#888"/>'
            f'<line x1="28" x2="28" y1="20" y2="{height - 40}" stroke="#888"/>')
    return (f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'{axis}{"".join(bars)}{_ylabel(unit, height)}</svg><figcaption>{html.escape(title)}</figcaption></figure>')


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], width: int = 420, height: int = 220,
               xlabel: str = "step", ylabel: str = "") -> str:
    """One polyline per series (a one-point series, e.g. a single eval, is drawn as a dot); non-finite points are dropped."""
    series = {k: [(x, y) for x, y in s if _finite(x) and _finite(y)] for k, s in series.items()}
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    sx = (width - 60) / ((x1 - x0) or 1)
    sy = (height - 50) / ((y1 - y0) or 1)
    lines, legend = [], []
    for i, (name, s) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        xy = [(50 + (x - x0) * sx, height - 30 - (y - y0) * sy) for x, y in s]
        if len(xy) > 1:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
            lines.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{d}"/>')
        else:
            lines += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in xy]
        legend.append(f'<text x="{60 + 110 * i}" y="14" font-size="11" fill="{c}">{html.escape(name)}</text>')
    axes = (f'<text x="4" y="{height - 30}" font-size="10">{y0:.3g}</text><text x="4" y="30" font-size="10">{y1:.3g}</text>'
            f'<text x="50" y="{height - 10}" font-size="10">{x0:.0f}</text>'
            f'<text x="{width - 30}" y="{height - 10}" font-size="10">{x1:.0f}</text>'
            f'<text x="{width / 2:.0f}" y="{height - 10}" text-anchor="middle" font-size="10" fill="#555">'
            f'{html.escape(xlabel)}</text>{_ylabel(ylabel, height)}'
            f'<line x1="48" x2="48" y1="24" y2="{height - 28}" stroke="#888"/>'
            f'<line x1="48" x2="{width - 8}" y1="{height - 28}" y2="{height - 28}" stroke="#888"/>')
    return (f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'{"".join(lines)}{"".join(legend)}{axes}</svg><figcaption>{html.escape(title)}</figcaption></figure>')


def histogram(title: str, values: Iterable[float], bins: int = 12) -> str:
    """At most `bins` bars, each labelled by the values it counts. Integers (token lengths) get
    whole-number bins: fractional ones would cover uneven numbers of lengths and round to the
    same label, which merges their bars in the chart."""
    v = sorted(values)
    if not v:
        return ""
    lo, hi = v[0], v[-1]
    if all(float(x).is_integer() for x in v):
        lo, hi = int(lo), int(hi)
        step = -(-(hi - lo + 1) // bins)
        counts = [0] * ((hi - lo) // step + 1)
        for x in v:
            counts[(int(x) - lo) // step] += 1
        labels = [str(k) if step == 1 else f"{k}-{k + step - 1}" for k in range(lo, hi + 1, step)]
        return bar_chart(title, {lab: float(c) for lab, c in zip(labels, counts)}, width=520, unit="samples")
    if hi == lo:
        return bar_chart(title, {f"{lo:.6g}": float(len(v))}, width=520, unit="samples")
    step = (hi - lo) / bins
    counts_ = [0] * bins
    for x in v:
        counts_[min(int((x - lo) / step), bins - 1)] += 1
    for nd in range(7):  # fewest decimals that keep every bin's label distinct
        labels = [f"{lo + i * step:.{nd}f}" for i in range(bins)]
        if len(set(labels)) == bins:
            break
    return bar_chart(title, {lab: float(c) for lab, c in zip(labels, counts_)}, width=520, unit="samples")


def media_block(files: list[Path], captions: list[str] | None = None) -> str:
    """Images and audio players inline, each captioned (by default with its file name)."""
    out = []
    for f, cap in zip(files, captions or [f.name for f in files]):
        cap = html.escape(cap)
        if f.suffix == ".png":
            out.append(f'<figure class="m"><img src="{data_uri(f)}" width="96" height="96" alt="{cap}">'
                       f'<figcaption>{cap}</figcaption></figure>')
        elif f.suffix == ".wav":
            out.append(f'<figure class="m"><audio controls src="{data_uri(f)}"></audio><figcaption>{cap}</figcaption></figure>')
    return "".join(out)


def gate_table(gates: list[dict], with_stage: bool = True) -> str:
    """One row per gate: statistic, threshold, verdict, what it means, and a link to its report."""
    if not gates:
        return ""
    head = ("<th>stage</th>" if with_stage else "") + ("<th>gate</th><th>statistic</th><th>threshold</th>"
                                                        "<th>verdict</th><th>what it means</th>")
    rows = []
    for g in gates:
        link = f' (<a href="{html.escape(g["link"])}">report</a>)' if g.get("link") else ""
        rows.append(f'<tr class="{"pass" if g["pass"] else "fail"}">'
                    + (f'<td>{html.escape(g.get("stage", ""))}</td>' if with_stage else "")
                    + f'<td>{html.escape(g["gate"])}</td><td>{html.escape(g["statistic"])}</td>'
                    f'<td>{html.escape(g["threshold"])}</td><td class="v">{"PASS" if g["pass"] else "FAIL"}</td>'
                    f'<td>{html.escape(g["meaning"])}{link}</td></tr>')
    return f'<table class="gates"><tr>{head}</tr>{"".join(rows)}</table>'


def write_report(out: Path, title: str, stages: list[dict], sections: list[tuple[str, str]],
                 gates: list[dict] | None = None, look_at: dict[str, str] | None = None) -> Path:
    """stages: rows with stage, pass, seconds, dir and key numbers; sections: (heading, html) pairs;
    gates: eval/gate_rows rows with their stage; look_at: a sentence per stage heading."""
    rows = []
    for s in stages:
        extra = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("stage", "pass", "seconds", "dir", "error"))
        err = f'<div class="err">{html.escape(s["error"])}</div>' if s.get("error") else ""
        rows.append(f'<tr class="{"pass" if s["pass"] else "fail"}"><td>{html.escape(s["stage"])}</td>'
                    f'<td>{"PASS" if s["pass"] else "FAIL"}</td><td>{s["seconds"]}</td>'
                    f'<td>{html.escape(extra)}{err}</td></tr>')
    gates, look_at = gates or [], look_at or {}
    body = "".join(f"<section><h2>{html.escape(h)}</h2>"
                   + (f'<p class="look"><b>What to look at:</b> {html.escape(look_at[h])}</p>' if h in look_at else "")
                   + gate_table([g for g in gates if g.get("stage") == h], with_stage=False) + c + "</section>"
                   for h, c in sections if c or h in look_at)
    failed = [g for g in gates if not g["pass"]]
    summary = (f'<p>{len(gates) - len(failed)} of {len(gates)} gates pass'
               + (f'; failed: {html.escape(", ".join(g["stage"] + ": " + g["gate"] for g in failed))}' if failed else "")
               + "</p>" + gate_table(gates)) if gates else ""
    if summary:
        summary = "<h2>Gates</h2>" + summary
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}} #stages tr.pass td:nth-child(2){{color:#2a7a3b;font-weight:bold}}
#stages tr.fail td:nth-child(2){{color:#b5443a;font-weight:bold}} figure{{display:inline-block;margin:6px}} img{{image-rendering:pixelated}} .m figcaption{{font-size:10px}}
.err{{color:#b5443a;font-size:12px}} table.gates tr.pass td.v{{color:#2a7a3b;font-weight:bold}}
table.gates tr.fail td.v{{color:#b5443a;font-weight:bold}} table.gates tr.fail{{background:#fbeeee}} .look{{font-size:13px}}
</style></head><body><h1>{html.escape(title)}</h1>
<table id="stages"><tr><th>stage</th><th>result</th><th>seconds</th><th>numbers</th></tr>{"".join(rows)}</table>
{summary}
{body}</body></html>"""
    p = out / "report.html"
    write_file(p, page)
    return p


def json_or_none(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None
