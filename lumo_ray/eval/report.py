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


def _ylabel(text: str, height: int, top: int = 20) -> str:
    """The unit, written up the left edge beside the plot (between `top` and the x axis)."""
    return (f'<text transform="translate(10,{(top + height - 30) / 2:.0f}) rotate(-90)" text-anchor="middle" '
            f'font-size="10" fill="#555">{html.escape(text)}</text>') if text else ""


def _wrap(text: str, room: float, size: int) -> list[str]:
    """`text` in lines of whole words, each as narrow as `room` allows (a word wider than it stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and text_width(lines[-1] + " " + word, size) <= room:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def bar_chart(title: str, values: dict[str, float], width: int = 420, height: int = 200, unit: str = "") -> str:
    """Vertical bars from a zero line (negative values hang below it), with value labels.

    A missing or non-finite value (a NaN loss, an infinite SNR) keeps its label but draws no bar,
    so one bad number cannot break the scale of the others. Each bar's name is written in full
    under it: wrapped at spaces to the bar's width, or, where one word is wider than that, turned
    to run down the page; the chart grows by what the names need."""
    if not values:
        return ""
    bw = (width - 40) / len(values)
    wrapped = [_wrap(k, bw - 4, 10) for k in values]
    turned = any(text_width(line, 10) > bw - 4 for ls in wrapped for line in ls)
    names_h = (max(text_width(k, 10) for k in values) if turned else 12 * max(map(len, wrapped))) + 8
    height += int(names_h) - 20  # the plot keeps its own height above the names
    finite = [v for v in values.values() if _finite(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    bottom = height - names_h - 16  # the plot's lowest point, with room for a value under a negative bar
    scale = (bottom - 20) / ((hi - lo) or 1.0)
    zero = 20 + hi * scale

    def name(i: int, k: str) -> str:
        cx = 30 + i * bw + bw / 2
        if turned:
            return (f'<text transform="translate({cx + 3:.1f},{bottom + 20:.1f}) rotate(-90)" text-anchor="end" '
                    f'font-size="10">{html.escape(k)}</text>')
        # a line's trailing space keeps the words apart in the text's content (what a screen reader reads)
        spans = "".join(f'<tspan x="{cx:.1f}" dy="{0 if j == 0 else 12}">{html.escape(t)}{" " * (j < len(wrapped[i]) - 1)}'
                        f'</tspan>' for j, t in enumerate(wrapped[i]))
        return f'<text x="{cx:.1f}" y="{bottom + 28:.1f}" text-anchor="middle" font-size="10">{spans}</text>'

    bars = []
    for i, (k, v) in enumerate(values.items()):
        if not _finite(v):
            bars.append(name(i, k) + f'<text x="{30 + i * bw + bw / 2:.1f}" y="{zero - 4:.1f}" '
                        f'text-anchor="middle" font-size="10">{html.escape(str(v))}</text>')
            continue
        x, top = 30 + i * bw, zero - max(v, 0) * scale
        bars.append(f'<rect x="{x + 4:.1f}" y="{top:.1f}" width="{bw - 8:.1f}" height="{abs(v) * scale:.1f}" '
                    f'fill="{PALETTE[i % len(PALETTE)]}"/>{name(i, k)}<text x="{x + bw / 2:.1f}" '
                    f'y="{top - 4 if v >= 0 else zero + abs(v) * scale + 12:.1f}" text-anchor="middle" '
                    f'font-size="10">{v:.3g}</text>')
    axis = (f'<line x1="28" x2="{width - 8}" y1="{zero:.1f}" y2="{zero:.1f}" stroke="#888"/>'
            f'<line x1="28" x2="28" y1="20" y2="{bottom:.1f}" stroke="#888"/>')
    return (f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'{axis}{"".join(bars)}{_ylabel(unit, int(bottom) + 30)}</svg><figcaption>{html.escape(title)}</figcaption></figure>')


def text_width(text: str, size: float) -> float:
    """A generous width of `text` in a sans-serif font of `size` px (no font metrics without a browser):
    wider than Chromium draws it, so a box sized by it holds the text."""
    wide = sum(c.isupper() or c in "mwMW@%" for c in text)
    return size * (0.62 * len(text) + 0.25 * wide) + 2


def legend(names: list[str], colors: list[str], width: int, x0: int = 50, size: int = 11) -> tuple[str, int]:
    """A swatch and the full name per series, laid out in rows that wrap at `width`; returns its SVG and height."""
    items, x, y = [], x0, 14
    for name, c in zip(names, colors):
        w = 18 + text_width(name, size)
        if x > x0 and x + w > width - 8:  # wrap: the next row starts under the first item
            x, y = x0, y + size + 5
        items.append(f'<line x1="{x}" x2="{x + 14}" y1="{y - 4}" y2="{y - 4}" stroke="{c}" stroke-width="3"/>'
                     f'<text x="{x + 18}" y="{y}" font-size="{size}" fill="{c}" class="legend">{html.escape(name)}</text>')
        x += w + 14
    return "".join(items), y + 6


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], width: int = 420, height: int = 220,
               xlabel: str = "step", ylabel: str = "") -> str:
    """One polyline per series (a one-point series, e.g. a single eval, is drawn as a dot); non-finite points
    are dropped. The legend above the plot names every series in full: it wraps into as many rows as it
    needs (the chart grows by them), and the chart widens for a name longer than the whole width."""
    series = {k: [(x, y) for x, y in s if _finite(x) and _finite(y)] for k, s in series.items()}
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    width = max(width, int(50 + 18 + max(text_width(k, 11) for k in series) + 8))
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    keys, top = legend(list(series), colors, width)
    height += top - 20  # the plot keeps its own height under the legend
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    sx = (width - 60) / ((x1 - x0) or 1)
    sy = (height - 30 - top - 4) / ((y1 - y0) or 1)
    lines = []
    for c, s in zip(colors, series.values()):
        xy = [(50 + (x - x0) * sx, height - 30 - (y - y0) * sy) for x, y in s]
        if len(xy) > 1:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
            lines.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{d}"/>')
        else:
            lines += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in xy]
    axes = (f'<text x="4" y="{height - 30}" font-size="10">{y0:.3g}</text>'
            f'<text x="4" y="{top + 8}" font-size="10">{y1:.3g}</text>'
            f'<text x="50" y="{height - 10}" font-size="10">{x0:.0f}</text>'
            f'<text x="{width - 8}" y="{height - 10}" text-anchor="end" font-size="10">{x1:.0f}</text>'
            f'<text x="{width / 2:.0f}" y="{height - 10}" text-anchor="middle" font-size="10" fill="#555">'
            f'{html.escape(xlabel)}</text>{_ylabel(ylabel, height, top)}'
            f'<line x1="48" x2="48" y1="{top}" y2="{height - 28}" stroke="#888"/>'
            f'<line x1="48" x2="{width - 8}" y1="{height - 28}" y2="{height - 28}" stroke="#888"/>')
    return (f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'{"".join(lines)}{keys}{axes}</svg><figcaption>{html.escape(title)}</figcaption></figure>')


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


def labelled_table(rows: list[tuple[str, str]], cls: str = "kv", id_: str = "") -> str:
    """A two-column table, name | value (the value carries its unit)."""
    if not rows:
        return ""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="{cls}"{f" id={chr(34)}{id_}{chr(34)}" if id_ else ""}>{body}</table>'


def _value(v) -> str:
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "none"
    return str(v)


def numbers_table(numbers: dict, label=None) -> str:
    """A stage's key numbers as labelled rows; label(key) -> (name, unit) (default: the key, no unit)."""
    rows = []
    for k, v in numbers.items():
        name, unit = label(k) if label else (k, "")
        rows.append((name, _value(v) + (f" {unit}" if unit and v is not None and not isinstance(v, bool) else "")))
    return labelled_table(rows, "nums")


def write_report(out: Path, title: str, stages: list[dict], sections: list[tuple[str, str]],
                 gates: list[dict] | None = None, look_at: dict[str, str] | None = None,
                 header: list[tuple[str, str]] | None = None, label=None) -> Path:
    """stages: rows with stage, pass, seconds, dir and key numbers; sections: (heading, html) pairs;
    gates: eval/gate_rows rows with their stage; look_at: a sentence per stage heading; header: (name,
    value) rows at the top, where the run came from (eval/run_header.rows); label: key -> (name, unit)
    of the stages' numbers."""
    rows = []
    for s in stages:
        extra = {k: v for k, v in s.items() if k not in ("stage", "pass", "seconds", "dir", "error")}
        err = f'<div class="err">{html.escape(s["error"])}</div>' if s.get("error") else ""
        rows.append(f'<tr class="{"pass" if s["pass"] else "fail"}"><td>{html.escape(s["stage"])}</td>'
                    f'<td>{"PASS" if s["pass"] else "FAIL"}</td><td>{s["seconds"]}</td>'
                    f'<td>{numbers_table(extra, label)}{err}</td></tr>')
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
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}} #stages>tbody>tr.pass>td:nth-child(2){{color:#2a7a3b;font-weight:bold}}
#stages>tbody>tr.fail>td:nth-child(2){{color:#b5443a;font-weight:bold}} figure{{display:inline-block;margin:6px}} img{{image-rendering:pixelated}} .m figcaption{{font-size:10px}}
.err{{color:#b5443a;font-size:12px}} table.gates tr.pass td.v{{color:#2a7a3b;font-weight:bold}}
table.gates tr.fail td.v{{color:#b5443a;font-weight:bold}} table.gates tr.fail{{background:#fbeeee}} .look{{font-size:13px}}
table.kv th,table.nums th{{text-align:left;font-weight:normal;color:#555;background:#f6f6f6}}
table.nums td,table.nums th{{border:none;border-bottom:1px solid #eee;padding:1px 6px;font-size:12px}}
#header{{margin-bottom:14px}}
</style></head><body><h1>{html.escape(title)}</h1>
{labelled_table(header or [], "kv", "header")}
<table id="stages"><tr><th>stage</th><th>result</th><th>seconds</th><th>numbers</th></tr>{"".join(rows)}</table>
{summary}
{body}</body></html>"""
    p = out / "report.html"
    write_file(p, page)
    return p


def json_or_none(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None
