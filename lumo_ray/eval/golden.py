"""Golden generations (stage 4): a fixed, seeded set of prompts per task, generated with the
constrained decoder and decoded to PNG / WAV / text, so every checkpoint can be looked at and
compared with the last.

The prompts are `gates.golden_set` (synthetic captions for t2x, synthetic media for x2t): the same
set at every checkpoint of every run with the same seed. Each call writes `<dir>/<task>/<id>.{png,wav,txt}`
and `<dir>/golden.json` (task, id, prompt, file, text, compliant).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..generate import TARGET, GenOptions, Run, check_and_decode, generate_spans, save_output, task_spec
from ..storage import write_file
from .gates import available_tasks, golden_set


def write_golden(run: Run, out_dir: str | Path, n: int = 4, seed: int = 0, log=None) -> dict:
    """Generate and decode the golden set of every task the run's token space has -> golden.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = GenOptions(seed=seed)
    was = run.model.training
    run.model.eval()
    rows = []
    try:
        for task in available_tasks(run):
            gold = golden_set(run, task, n, seed)
            prompts = [g["prompt"] for g in gold]
            spec = task_spec(run, task, opts)
            for i, (g, gen) in enumerate(zip(gold, generate_spans(run, task, prompts, opts))):
                chk, val = check_and_decode(run, spec, prompts[i], gen, seed=seed + i)
                row = {"task": task, "id": g["id"], "prompt": g.get("caption") or g.get("source"),
                       "ok": chk.ok, "file": None, "text": None}
                if val is not None:
                    row["file"] = str(save_output(run, TARGET[task], val, out / task / g["id"]).relative_to(out))
                    if TARGET[task] == "text":
                        row["text"] = str(val)
                rows.append(row)
    finally:
        run.model.train(was)
    rep = {"n": n, "seed": seed, "rows": rows, "compliant": sum(r["ok"] for r in rows) / max(1, len(rows))}
    write_file(out / "golden.json", json.dumps(rep, indent=2) + "\n")
    if log:
        log(f"golden: {len(rows)} generations ({rep['compliant']:.0%} compliant) -> {out}")
    return rep


def golden_html(golden_dir: str | Path, title: str = "") -> str:
    """An image grid with the prompts, audio players and captions of one golden.json (inline media)."""
    import html

    from .report import data_uri

    d = Path(golden_dir)
    f = d / "golden.json"
    if not f.exists():
        return ""
    rows = json.loads(f.read_text())["rows"]
    cells = []
    for r in rows:
        cap = html.escape(str(r["prompt"]))
        p = d / r["file"] if r.get("file") else None
        if p is None:
            media = "<em>not decodable</em>"
        elif p.suffix == ".png":
            media = f'<img src="{data_uri(p)}" width="96" height="96" style="image-rendering:pixelated" alt="{cap}">'
        elif p.suffix == ".wav":
            media = f'<audio controls style="width:196px" src="{data_uri(p)}"></audio>'
        else:
            media = f"<q>{html.escape(str(r.get('text') or ''))}</q>"
        cells.append(f'<figure class="golden" data-task="{r["task"]}" style="display:inline-block;margin:4px;'
                     f'vertical-align:top;width:200px">{media}<figcaption><b>{r["task"]}</b> {cap}</figcaption></figure>')
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    return f'<div class="golden-grid">{head}{"".join(cells)}</div>'
