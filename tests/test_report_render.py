"""The demo's report.html renders in a real headless Chromium with no network (issue 7).

A report is built with the real builder from real inputs (a logistic regression trained here for its
loss curve and feature ablation, token lengths of the embedded corpus, a PNG and a WAV written here,
stages that pass and fail), loaded over the DevTools pipe, and checked as the browser shows it.
Skipped when no Chromium is installed (Debian: `apt-get install chromium`).
"""
from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from lumo_ray.eval import report
from lumo_ray.eval.report_sections import number_label

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")

# A closed network makes Chromium's own background services fail noisily; these keep it quiet.
# The proxy points at a closed port, so a request the page makes cannot leave the machine.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--force-color-profile=srgb", "--proxy-server=http://127.0.0.1:9",
         "--remote-debugging-pipe"]

# What the page shows, read after every image decoded and every audio element has its metadata.
PROBE = """(async () => {
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  await Promise.all([...document.querySelectorAll('audio')].map(a => a.readyState >= 1 || a.error ? 0 :
      new Promise(r => { a.addEventListener('loadedmetadata', r); a.addEventListener('error', r); })));
  const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  return {
    gates: [...document.querySelectorAll('table.gates')].map(t => [...t.rows].slice(1).map(tr => ({
      cells: [...tr.cells].map(c => c.innerText.trim()), verdictColor: getComputedStyle(tr.querySelector('td.v')).color,
      links: [...tr.querySelectorAll('a')].map(a => a.getAttribute('href'))}))),
    rows: [...document.querySelectorAll('#stages > tbody > tr')].slice(1).map(tr => ({
      cells: [...tr.cells].map(c => c.innerText.trim()), color: getComputedStyle(tr.cells[1]).color, box: box(tr)})),
    svgs: [...document.querySelectorAll('svg')].map(s => ({label: s.getAttribute('aria-label'), box: box(s),
      rects: [...s.querySelectorAll('rect')].map(r => ({fill: r.getAttribute('fill'), box: box(r)})),
      texts: [...s.querySelectorAll('text')].map(t => t.textContent),
      // each text's box [left, top, right, bottom] relative to its SVG's, and whether it is a legend entry
      textBoxes: [...s.querySelectorAll('text')].map(t => { const r = t.getBoundingClientRect(), o = s.getBoundingClientRect();
        return {text: t.textContent, legend: t.classList.contains('legend'),
                box: [r.left - o.left, r.top - o.top, r.right - o.left, r.bottom - o.top]}; }),
      lines: [...s.querySelectorAll('polyline')].map(box)})),
    imgs: [...document.images].map(i => ({alt: i.alt, nw: i.naturalWidth, nh: i.naturalHeight, box: box(i)})),
    audio: [...document.querySelectorAll('audio')].map(a => ({duration: a.duration, error: a.error && a.error.code,
      box: box(a)})),
    headings: [...document.querySelectorAll('h2')].map(h => h.innerText),
    header: [...document.querySelectorAll('#header tr')].map(tr => [...tr.cells].map(c => c.innerText.trim())),
    text: document.body.innerText,
  };
})()"""


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-terminated JSON)."""

    def __init__(self, profile: Path):
        self.log = profile.with_name(profile.name + ".log")
        cmd_r, self._w = os.pipe()
        self._r, ev_w = os.pipe()
        # bash moves the pipe ends to fds 3/4; ours sit above 9 so neither redirect clobbers the other
        a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(ev_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r), os.close(ev_w)
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{a} 4>&{b} {a}<&- {b}>&-', CHROMIUM, *FLAGS,
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(a, b), stdout=subprocess.DEVNULL, stderr=(err := self.log.open("wb")), start_new_session=True)
        err.close()
        os.close(a), os.close(b)
        self._buf, self._id, self.events = b"", 0, []

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.time()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer over the DevTools pipe; {self._tail()}")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (rc={self.proc.poll()}); {self._tail()}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def _tail(self) -> str:
        return f"its log {self.log} ends:\n" + self.log.read_text(errors="replace")[-2000:]

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._next(deadline))

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(10)
        except Exception:  # its own process group: the renderers go with it
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._r), os.close(self._w)


def render(page: Path, profile: Path) -> dict:
    """Load `page` in a fresh headless Chromium; return what it shows, a full-page screenshot, the
    URLs it requested (and those that failed), what it logged and any script exception."""
    b = Chromium(profile)
    try:
        tid = b.send("Target.createTarget", url="about:blank")["targetId"]
        sid = b.send("Target.attachToTarget", targetId=tid, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            b.send(f"{domain}.enable", session=sid)
        b.send("Page.navigate", session=sid, url=page.resolve().as_uri())
        b.wait_for("Page.loadEventFired")
        dom = b.send("Runtime.evaluate", session=sid, expression=PROBE, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in dom, dom
        shot = b.send("Page.captureScreenshot", session=sid, format="png", captureBeyondViewport=True)
        ev = b.events
        return {"dom": dom["result"]["value"], "png": base64.b64decode(shot["data"]),
                "requests": [e["params"]["request"]["url"] for e in ev if e["method"] == "Network.requestWillBeSent"],
                "failed": [e["params"] for e in ev if e["method"] == "Network.loadingFailed"],
                "log": [e["params"]["entry"] for e in ev if e["method"] == "Log.entryAdded"],
                "exceptions": [e["params"] for e in ev if e["method"] == "Runtime.exceptionThrown"]}
    finally:
        b.close()


def _train_logistic(steps: int = 40, seed: int = 0):
    """A real training run: logistic regression by gradient descent on data where only features 0-1 matter."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 4))
    y = (x[:, 0] - 0.5 * x[:, 1] + 0.1 * rng.normal(size=256) > 0).astype(float)
    tr, ev = slice(0, 192), slice(192, 256)
    w = np.zeros(4)

    def loss(xs, ys):
        p = 1 / (1 + np.exp(-xs @ w))
        return float(-np.mean(ys * np.log(p + 1e-9) + (1 - ys) * np.log(1 - p + 1e-9)))

    curves = {"train loss": [], "eval loss": []}
    for step in range(steps):
        p = 1 / (1 + np.exp(-x[tr] @ w))
        w -= 0.5 * x[tr].T @ (p - y[tr]) / len(p)
        curves["train loss"].append((step, loss(x[tr], y[tr])))
        if step % 10 == 9:
            curves["eval loss"].append((step, loss(x[ev], y[ev])))
    xs = x[ev].copy()
    ablation = {"all features": loss(xs, y[ev])}
    for j in (0, 2):  # zero out a feature that matters and one that does not
        z = xs.copy()
        z[:, j] = 0
        ablation[f"feature {j} zeroed"] = loss(z, y[ev])
    return curves, ablation


def _build_report(out: Path) -> tuple[Path, dict]:
    curves, ablation = _train_logistic()
    corpus = Path(report.__file__).parents[1] / "assets" / "tiny_corpus.txt"
    lengths = [len(line.split()) for line in corpus.read_text().splitlines() if line.strip()]
    media = out / "media"
    media.mkdir()
    yy, xx = np.mgrid[0:24, 0:40]
    Image.fromarray(np.stack([xx * 6, yy * 10, np.full_like(xx, 128)], -1).astype(np.uint8)).save(media / "ramp.input.png")
    t = np.arange(8000) / 16000
    sf.write(media / "beep.input.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)  # 0.5 s
    stages = [{"stage": "uti", "pass": True, "seconds": 1.5, "dir": str(out), "samples": 6},
              {"stage": "audit", "pass": True, "seconds": 2.0, "dir": str(out), "audio_snr_db": 3.1},
              {"stage": "data", "pass": False, "seconds": 0.4, "dir": str(out), "error": "RuntimeError: shard 3 <missing>"}]
    sections = [("training", report.line_chart("logistic loss", curves)
                 + report.bar_chart("feature ablation: eval loss", ablation)),
                ("tokens", report.histogram("corpus words per line", lengths)),
                ("media", report.media_block([media / "ramp.input.png", media / "beep.input.wav"]))]
    gates = [{"stage": "lm", **g} for g in _ablation_gates(out)]
    page = report.write_report(out, "lumo demo", stages, sections, gates, {"training": "the falling loss"},
                               label=number_label)
    return page, {"curves": curves, "ablation": ablation, "lengths": lengths, "gates": gates}


def _ablation_gates(out: Path) -> list[dict]:
    """Gate rows (eval/gate_rows) of a modality-ablation report with the real statistics: the image
    conditions raise the loss on every sample, the audio shuffle only at chance."""
    from lumo_ray.eval.gate_rows import modality_rows
    from lumo_ray.eval.stats import paired

    rng = np.random.default_rng(0)
    mods = {"image": {"shuffle": paired(rng.normal(0.4, 0.1, 64)), "noise": paired(rng.normal(0.8, 0.1, 64))},
            "audio": {"shuffle": paired(rng.normal(0.0, 0.1, 64)), "noise": paired(rng.normal(0.9, 0.1, 64))}}
    (out / "ablation").mkdir()
    (out / "ablation" / "report.md").write_text("# modality ablation\n")
    thr = {"shuffle": {"gap": 0.1, "win": 0.8}, "noise": {"gap": 0.15, "win": 0.85}, "p": 0.01}
    return modality_rows({"modalities": mods, "thresholds": thr}, "ablation/report.md", "modality ablation:")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    page, inputs = _build_report(out)
    return page, inputs, render(page, out / "profile")


def test_stage_table_shows_each_stage_with_pass_or_fail(rendered):
    _, _, r = rendered
    rows = {row["cells"][0]: row for row in r["dom"]["rows"]}
    assert list(rows) == ["uti", "audit", "data"]
    assert [rows[s]["cells"][1] for s in rows] == ["PASS", "PASS", "FAIL"]
    assert all(row["box"][0] > 0 and row["box"][1] > 0 for row in rows.values())
    # pass green, fail red, as the stylesheet says; the error is shown escaped, not parsed as a tag
    assert rows["uti"]["color"] == "rgb(42, 122, 59)" and rows["data"]["color"] == "rgb(181, 68, 58)"
    assert "RuntimeError: shard 3 <missing>" in rows["data"]["cells"][3]
    # the numbers as labelled rows, name then value with its unit
    assert rows["uti"]["cells"][3] == "real samples tokenized and decoded\t6 samples"
    assert rows["audit"]["cells"][3] == "audio SNR, all inputs\t3.1 dB"
    assert r["dom"]["headings"] == ["Gates", "training", "tokens", "media"]


def test_gate_rows_show_statistic_threshold_verdict_and_meaning(rendered):
    _, inputs, r = rendered
    (table,) = r["dom"]["gates"]  # the summary table (no section of the page is named after stage "lm")
    cells = {row["cells"][1]: row for row in table}
    assert list(cells) == [g["gate"] for g in inputs["gates"]] and len(cells) == 4
    ok, bad = cells["modality ablation: image shuffle"], cells["modality ablation: audio shuffle"]
    assert ok["cells"][0] == "lm" and re.match(r"gap \+0\.\d{3} \[0\.\d{3}, 0\.\d{3}\], win 1\.00, p \d\.\de-\d+, n 64",
                                                 ok["cells"][2]), ok["cells"][2]
    assert ok["cells"][3] == "gap >= 0.1, win >= 0.8, p < 0.01" and ok["cells"][4] == "PASS"
    assert bad["cells"][4] == "FAIL" and bad["verdictColor"] == "rgb(181, 68, 58)" and ok["verdictColor"] == "rgb(42, 122, 59)"
    assert "reads the audio" in bad["cells"][5] and bad["links"] == ["ablation/report.md"]
    assert "3 of 4 gates pass; failed: lm: modality ablation: audio shuffle" in r["dom"]["text"]
    assert "What to look at: the falling loss" in r["dom"]["text"]


def test_charts_render_with_their_data(rendered):
    _, inputs, r = rendered
    svgs = {s["label"]: s for s in r["dom"]["svgs"]}
    assert set(svgs) == {"logistic loss", "feature ablation: eval loss", "corpus words per line"}
    assert all(s["box"][0] > 100 and s["box"][1] > 100 for s in svgs.values())
    # every label, value and legend entry is drawn inside its chart, none clipped (test_report_header's check)
    from test_report_header import _outside
    assert _outside(r["dom"]) == []
    # one polyline per loss series, each spanning real width and height (the loss fell)
    loss = svgs["logistic loss"]
    assert len(loss["lines"]) == 2 and all(w > 50 and h > 5 for w, h in loss["lines"])
    # one bar per ablation arm, taller for higher loss: zeroing the feature that matters hurts most
    abl = inputs["ablation"]
    heights = dict(zip(abl, (rect["box"][1] for rect in svgs["feature ablation: eval loss"]["rects"])))
    assert max(heights, key=heights.get) == max(abl, key=abl.get) == "feature 0 zeroed"
    # each histogram bar shows how many lengths fall in its labelled range, at a height that matches
    hist = svgs["corpus words per line"]
    labels, counts = hist["texts"][0::2], [float(c) for c in hist["texts"][1::2]]
    lengths = np.array(inputs["lengths"])
    for lab, c in zip(labels, counts):
        a, b = (int(x) for x in (lab.split("-") if "-" in lab else (lab, lab)))
        assert c == ((lengths >= a) & (lengths <= b)).sum(), lab
    assert sum(counts) == len(lengths) and len(counts) == len(hist["rects"]) <= 12
    per_count = max(r["box"][1] for r in hist["rects"]) / max(counts)
    assert all(r["box"][1] == pytest.approx(c * per_count, abs=1) for r, c in zip(hist["rects"], counts))


def test_media_decode_in_the_browser(rendered):
    _, _, r = rendered
    (img,) = r["dom"]["imgs"]
    assert (img["alt"], img["nw"], img["nh"]) == ("ramp.input.png", 40, 24) and img["box"] == [96, 96]
    (audio,) = r["dom"]["audio"]
    assert audio["error"] is None and audio["duration"] == pytest.approx(0.5, abs=0.01) and audio["box"][0] > 0
    assert "ramp.input.png" in r["dom"]["text"] and "beep.input.wav" in r["dom"]["text"]


def test_screenshot_shows_the_page(rendered):
    _, _, r = rendered
    shot = np.asarray(Image.open(io.BytesIO(r["png"])).convert("RGB"))
    assert shot.shape[0] > 400 and shot.shape[1] > 400
    # the bars are painted: every pixel of the first ablation bar has the palette's first colour
    rgb = tuple(int(report.PALETTE[0][i:i + 2], 16) for i in (1, 3, 5))
    svgs = {s["label"]: s for s in r["dom"]["svgs"]}
    w, h = svgs["feature ablation: eval loss"]["rects"][0]["box"]
    painted = int(np.all(shot == rgb, axis=-1).sum())
    assert painted >= 0.9 * w * h > 0
    assert (shot < 250).any(axis=-1).mean() > 0.02  # not a blank page


def test_report_makes_no_network_requests(rendered, tmp_path):
    page, _, r = rendered
    html = page.read_text()
    # every resource is inlined: no URL but data: in any attribute that loads one, no tag that fetches
    refs = re.findall(r"""\b(?:src|poster|action|srcset)\s*=\s*["']?([^"'\s>]*)""", html, re.I)
    assert len(refs) == 2 and all(u.startswith("data:") for u in refs), [u[:40] for u in refs]
    links = re.findall(r"""\bhref\s*=\s*["']?([^"'\s>]*)""", html, re.I)  # gate rows link their report files
    assert links and all(":" not in u and not u.startswith("/") for u in links), links
    assert not re.search(r"<(?:script|link|iframe|object|embed)\b|@import|url\(", html, re.I)
    # everything Chromium fetched was the file itself or inlined data
    assert r["requests"][0] == page.resolve().as_uri()
    assert all(u.split(":", 1)[0] in ("file", "data") for u in r["requests"]), r["requests"]
    assert r["failed"] == [] and r["exceptions"] == []
    assert [e for e in r["log"] if e.get("level") in ("error", "warning")] == []
    # the same check sees a plain page reach out (it fails only at the closed proxy) ...
    url = "http://lumo-report.invalid/x.png"
    probe = tmp_path / "reaches_out.html"
    probe.write_text(f'<!doctype html><img src="{url}">')
    seen = render(probe, tmp_path / "p1")
    assert url in seen["requests"] and [f["errorText"] for f in seen["failed"]] == ["net::ERR_PROXY_CONNECTION_FAILED"]
    # ... while the report's own policy refuses a remote reference a section might carry before any fetch
    leaky = report.write_report(tmp_path, "leaky", [], [("s", f'<img src="{url}" alt="x">')])
    blocked = render(leaky, tmp_path / "p2")
    assert [f.get("blockedReason") for f in blocked["failed"]] == ["csp"], blocked["failed"]
    assert any("Content Security Policy" in e.get("text", "") for e in blocked["log"]), blocked["log"]


def test_golden_generations_show_as_a_grid_with_players(tmp_path):
    """Stage 4's golden generations (real constrained generations of a tiny run, decoded by the real
    codecs) appear as images with their prompts, audio players and generated captions."""
    from lumo_ray.eval.golden import golden_html, write_golden
    from lumo_ray.generate import load_run
    from test_generate_decode import make_tiny_run

    run = load_run(make_tiny_run(tmp_path / "run"))
    g = write_golden(run, tmp_path / "golden", n=2, seed=0)
    page = report.write_report(tmp_path, "lumo demo", [{"stage": "mmpt", "pass": True, "seconds": 1.0, "dir": "x"}],
                               [("mmpt", golden_html(tmp_path / "golden", "golden generations, step 6"))])
    dom = render(page, tmp_path / "profile")["dom"]
    t2i = [r["prompt"] for r in g["rows"] if r["task"] == "t2i"]
    imgs = {i["alt"]: i for i in dom["imgs"]}
    assert set(t2i) <= set(imgs) and all(imgs[c]["nw"] == run.adapters.image.image_size for c in t2i)
    assert len(dom["audio"]) == 2 and all(a["error"] is None and a["duration"] > 0.1 for a in dom["audio"])
    texts = [r["text"] for r in g["rows"] if r["task"] in ("i2t", "a2t")]
    assert len(texts) == 4 and all(t.strip()[:10] in dom["text"] for t in texts if t.strip())
    assert "golden generations, step 6" in dom["text"] and all(c in dom["text"] for c in t2i)
