"""report.html and summary.json say where they came from (issue 37): commit, config digest, seed, start,
wall time, machine and exit code at the top, as labelled rows, and every chart's legend whole.

Real `lumo demo` runs with the slow stages skipped: one as a process whose only stage (generate) fails
at once because the stage it needs did not run (an early-failing stage: exit 1), one in-process with
every stage skipped (exit 0). The header is read back from summary.json and from report.html, in text
and as headless Chromium shows it."""
from __future__ import annotations

import hashlib
import html
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

import lumo_ray
from lumo_ray.eval import report, run_header

REPO = Path(lumo_ray.__file__).resolve().parents[1]
SKIP_ALL_BUT_GENERATE = "demo.skip=[uti,audit,data,vlm,lm,mmpt]"


def _git(*args: str) -> str | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    p = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def header_cells(page: str) -> dict[str, str]:
    """report.html's header table as {name: value}, read from the page's text."""
    table = re.search(r'<table class="kv" id="header">(.*?)</table>', page, re.S)
    assert table, "report.html has no header table"
    return {html.unescape(k): html.unescape(v) for k, v in re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table[1])}


def header_problems(page: str, head: dict) -> list[str]:
    """What report.html's header gets wrong against summary.json's: a row missing or a value that is not
    the run's (commit, digest, seed, start, wall time, exit code, CPU and software versions)."""
    cells, m = header_cells(page), head.get("machine") or {}
    want = {"lumo_ray commit": head.get("commit") or f"installed lumo-ray {head.get('version')}",
            "config digest": (head.get("config_sha256") or "")[:run_header.DIGEST_CHARS],
            "seed (demo.seed)": str(head.get("seed")), "started (UTC)": head.get("started_utc"),
            "wall time": f"{head.get('wall_s')} s", "exit code": str(head.get("exit_code")),
            "machine": f"{m.get('cpu')}, {m.get('cpus')} CPUs", "software": f"torch {m.get('torch')}"}
    out = [f"missing row: {k}" for k in want if k not in cells]
    out += [f"{k}: {cells[k]!r} does not show {v!r}" for k, v in want.items()
            if k in cells and not (cells[k] == v if k.startswith("seed") else cells[k].split(" (")[0] == v if k == "exit code"
                                   else str(v) in cells[k])]
    return out + [f"summary.json: {p}" for p in run_header.check(head)]


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """`lumo demo` as a process, seed 7, only the generate stage, which fails at once (exit 1)."""
    out = tmp_path_factory.mktemp("hdr") / "demo"
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "lumo_ray.cli", "demo", "--out", str(out), "--set", SKIP_ALL_BUT_GENERATE,
                        "--set", "demo.seed=7"], capture_output=True, text=True, timeout=300)
    return out, p, t0, time.time()


def test_header_of_an_early_failing_demo_is_the_runs(failed_run):
    import json

    import torch

    out, p, t0, t1 = failed_run
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    head = summary["header"]
    assert run_header.check(head) == []
    assert head["exit_code"] == p.returncode  # the number the process returned
    assert [s["stage"] for s in summary["stages"]] == ["generate"] and "needs the results" in summary["stages"][0]["error"]
    commit = _git("rev-parse", "HEAD")
    if commit is not None:  # a checkout: its HEAD, and whether tracked files differ from it
        assert head["commit"] == commit
        assert head["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no"))
    else:
        assert head["commit"] is None and head["version"]
    cfg = out / "config.yaml"
    assert head["seed"] == yaml.safe_load(cfg.read_text())["demo"]["seed"] == 7
    assert head["config_sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
    assert t0 - 1 <= datetime.fromisoformat(head["started_utc"]).timestamp() <= t1
    assert head["started_utc"].endswith("+00:00") and 0 <= head["wall_s"] <= t1 - t0
    m = head["machine"]
    assert (m["cpus"], m["python"], m["torch"]) == (os.cpu_count(), platform.python_version(), torch.__version__)
    assert m["gpus"] == ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                         if torch.cuda.is_available() else [])
    page = (out / "report.html").read_text()
    assert header_problems(page, head) == []
    assert page.index('id="header"') < page.index('id="stages"')  # at the top
    assert "exit code 1" in p.stdout


def test_the_header_check_catches_a_doctored_report(failed_run):
    import json

    out, _, _, _ = failed_run
    page, head = (out / "report.html").read_text(), json.loads((out / "summary.json").read_text())["header"]
    assert header_problems(page, head) == []
    assert header_problems(page.replace("<th>seed (demo.seed)</th><td>7</td>", "<th>seed (demo.seed)</th><td>0</td>"), head) == [
        "seed (demo.seed): '0' does not show '7'"]
    assert header_problems(re.sub(r"<tr><th>exit code</th>.*?</tr>", "", page), head) == ["missing row: exit code"]
    no_code = {k: v for k, v in head.items() if k != "exit_code"}
    assert "summary.json: missing exit_code" in header_problems(page, no_code)
    assert run_header.check({**head, "commit": None, "version": None}) == ["neither a commit nor a version"]


def test_a_passing_demo_exits_0_and_says_so_and_a_bad_skip_writes_nothing(tmp_path):
    """In-process `lumo` (the code main() returns is the process's): every stage skipped passes."""
    import json

    from lumo_ray.cli.main import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--set", "demo.skip=[uti,audit,data,vlm,lm,mmpt,generate]"]) == 0
    head = json.loads((out / "summary.json").read_text())["header"]
    assert head["exit_code"] == 0 and head["seed"] == 0 and run_header.check(head) == []
    assert header_cells((out / "report.html").read_text())["exit code"] == "0 (every stage passed)"
    bad = tmp_path / "bad"
    assert main(["demo", "--out", str(bad), "--set", "demo.skip=[vlm,lmm]"]) == 2  # a config error, before writing
    assert not bad.exists()


def test_an_interrupted_demo_reports_130(tmp_path):
    """Ctrl-C in a stage: the process exits 130 and the report it leaves says so, with the stage cut short."""
    import json
    import signal

    out = tmp_path / "demo"
    p = subprocess.Popen([sys.executable, "-m", "lumo_ray.cli", "demo", "--out", str(out),
                          "--set", "demo.skip=[audit,data,vlm,lm,mmpt,generate]"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         # a shell's background job starts with SIGINT ignored, and a Python started so
                         # never installs its KeyboardInterrupt handler: the child gets the default, as
                         # a terminal's Ctrl-C finds it
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:
            if line.startswith("=== [1/1] uti"):
                p.send_signal(signal.SIGINT)
                break
        rest = p.communicate(timeout=120)[0]
    finally:
        p.kill()
    assert p.returncode == 130, rest[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["header"]["exit_code"] == 130 and run_header.check(summary["header"]) == []
    assert summary["stages"][0]["stage"] == "uti" and summary["stages"][0]["error"].startswith("cut short: KeyboardInterrupt")
    assert header_cells((out / "report.html").read_text())["exit code"] == "130 (interrupted)"


def test_no_git_gives_the_installed_version(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # git not found: never a failure
    src = run_header.source()
    assert src["commit"] is None and src["dirty"] is None
    from importlib.metadata import version
    assert src["version"] == version("lumo-ray")
    rows = dict(run_header.rows({**src, "machine": {}}))
    assert rows["lumo_ray commit"] == f"not a git checkout: installed lumo-ray {src['version']}"


# -- in Chromium -----------------------------------------------------------------------------------

def _outside(dom: dict) -> list[str]:
    """Text of any chart that pokes out of its SVG (drawn clipped), and legend entries that overlap."""
    out = []
    for s in dom["svgs"]:
        w, h = s["box"]
        for t in s["textBoxes"]:
            l, tp, r, b = t["box"]
            if l < -0.5 or tp < -0.5 or r > w + 0.5 or b > h + 0.5:
                out.append(f"{s['label']}: {t['text']!r} at {[round(x) for x in t['box']]} outside {w:.0f}x{h:.0f}")
        leg = [t for t in s["textBoxes"] if t["legend"]]
        out += [f"{s['label']}: legend {a['text']!r} overlaps {b['text']!r}" for i, a in enumerate(leg) for b in leg[i + 1:]
                if a["box"][0] < b["box"][2] and b["box"][0] < a["box"][2] and a["box"][1] < b["box"][3] and b["box"][1] < a["box"][3]]
    return out


def test_header_and_full_legends_render_in_chromium(failed_run, tmp_path):
    from test_report_render import CHROMIUM, render

    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    import json

    out, _, _, _ = failed_run
    head = json.loads((out / "summary.json").read_text())["header"]
    dom = render(out / "report.html", tmp_path / "p0")["dom"]
    rows = dict(dom["header"])
    assert list(rows)[:3] == ["lumo_ray commit", "config digest", "seed (demo.seed)"] and rows["seed (demo.seed)"] == "7"
    for v in (head["commit"] or head["version"], head["config_sha256"][:16], head["started_utc"], "1 (a stage failed: a gate, or an error)",
              head["machine"]["cpu"], f"torch {head['machine']['torch']}"):
        assert v in dom["text"], v
    # charts: the stage-4 loss chart's task names, names longer than the chart, bar names wider than their bars
    tasks = {f"eval {t}": [(s, 8 - s / 10 - i) for s in (0, 5, 10)] for i, t in enumerate(("a2t", "i2t", "t2a", "t2i", "text"))}
    long = {"stage-4 eval loss per task of the run that started from the 3.3 warm start": [(0, 1.0), (9, 0.5)]}
    sections = [("charts", report.line_chart("stage-4 eval loss per task", tasks, ylabel="nats per target token")
                 + report.line_chart("one long name", long)
                 + report.bar_chart("names", {"image shuffle with a long name": 0.3, "audio noise": -0.2,
                                              "gen:an_input_file_name_longer_than_its_bar.wav": 0.1}, unit="nats"))]
    # and the old layout, a name every 110 px in a 420 px chart: the check must see it clipped
    clipped = ('<figure><svg width="420" height="220" role="img" aria-label="old">' + "".join(
        f'<text x="{60 + 110 * i}" y="14" font-size="11" class="legend">{t}</text>' for i, t in enumerate(tasks)) + "</svg></figure>")
    page = report.write_report(tmp_path, "charts", [], sections + [("old", clipped)])
    svgs = render(page, tmp_path / "p1")["dom"]["svgs"]
    assert _outside({"svgs": svgs[:-1]}) == []
    legend = [t["text"] for s in svgs[:-1] for t in s["textBoxes"] if t["legend"]]
    assert legend == [*tasks, *long]  # every series named, in full
    seen = _outside({"svgs": svgs[-1:]})
    assert any("'eval text'" in s and "outside 420x220" in s for s in seen), seen
