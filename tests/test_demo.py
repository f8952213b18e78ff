"""`lumo demo` runs its stages from any directory on the tiny default, reports where the results are,
and keeps its console to one line per event, read as it arrives through a pipe: a line at least every
10 s, stage lines with the elapsed time, no colour codes, no Ray C++ lines (what the training stages
learn has their own tests; here they run shortened for their console and report)."""
import json
import re
import subprocess
import sys
import threading
import time


# What the console of a run must not show: Ray / Train internals, Python warnings, tracebacks. (Ray's
# C++ lines, e.g. core_worker.cc's "max_restarts > 0" per Ray Data actor pool, _arrival_problems
# catches: they stay in Ray's session logs, pipelines.ray_env.native_lines_off_console.)
NOISE = ("Traceback", "Warning", "deprecated", "Failed to query Ray Train Controller",
         "Reporting training result", "Checkpoint successfully created", "Loading weights", "Writing model shards")


def _console_problems(text: str) -> list[str]:
    """Lines printed twice in a row (a rank-0 line logged twice) and lines with NOISE in them."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", s).rstrip() for s in text.splitlines()]
    out = [f"twice: {a}" for a, b in zip(lines, lines[1:]) if a and a == b]
    return out + [f"noise: {s}" for s in lines if any(n.lower() in s.lower() for n in NOISE)]


# The console as it arrives through a pipe (CI, `| tee`): a line at least every GAP_S seconds, stage
# lines that say how long the demo has run, no ANSI colour codes, no Ray C++ log lines.
GAP_S = 10.0
STAGE_LINE = re.compile(r"=== |\[(lm|mmpt) demo\] ")  # the lines that start or end a stage or a step


def _run_demo(args: list[str], cwd) -> tuple[int, str, str, list[tuple[float, str]]]:
    """`lumo demo ARGS` through pipes: (exit code, stdout, stderr, every line of either stream with
    the seconds from the start at which it arrived; also in <cwd>/console.txt)."""
    p = subprocess.Popen([sys.executable, "-m", "lumo_ray.cli", "demo", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=cwd)
    t0, lines, texts = time.monotonic(), [], {"out": [], "err": []}

    def read(stream, key: str) -> None:
        for line in stream:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))
            texts[key].append(line)

    readers = [threading.Thread(target=read, args=(p.stdout, "out")), threading.Thread(target=read, args=(p.stderr, "err"))]
    for r in readers:
        r.start()
    try:
        p.wait(timeout=900)
    finally:
        p.kill()
        for r in readers:
            r.join(timeout=60)
    lines.sort()
    (cwd / "console.txt").write_text("".join(f"{t:7.1f}  {s}\n" for t, s in lines))  # kept with the run
    return p.returncode, "".join(texts["out"]), "".join(texts["err"]), lines


def _arrival_problems(lines: list[tuple[float, str]]) -> list[str]:
    """Silences over GAP_S between lines, stage lines without the elapsed time, ANSI codes, Ray C++ lines."""
    out = [f"silent {b - a:.0f} s after: {s}" for (a, s), (b, _) in zip(lines, lines[1:]) if b - a > GAP_S]
    for _, s in lines:
        if "\x1b[" in s:
            out.append(f"ansi: {s!r}")
        if re.search(r"\.cc:\d+", s):
            out.append(f"ray c++: {s}")
        if STAGE_LINE.match(s) and not re.search(r"\(elapsed \d+ s\)", s):
            out.append(f"no elapsed time: {s}")
    return out


def test_demo_console_is_one_line_per_event_from_any_directory(tmp_path, sole_local_ray):
    """The uti, audit, data and VLM stages from a working directory with no ../shared above it (the
    real samples ship with the package): every stage passes, and the console has no repeated line, no
    Ray / Train internals, no warning and no traceback, and none of _arrival_problems."""
    out = tmp_path / "demo"
    rc, stdout, stderr, lines = _run_demo(["--out", str(out), "--set", "demo.images=12", "--set", "demo.audio=12",
                                           "--set", "demo.skip=[lm,mmpt,generate]"], tmp_path)
    assert rc == 0, stdout[-4000:] + stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert set(stages) == {"uti", "audit", "data", "vlm"} and all(s["pass"] for s in stages.values())
    assert stages["data"]["records"] == 24 and stages["data"]["errors"] == 0
    samples = json.loads((out / "uti" / "samples.json").read_text())  # the packaged real samples
    assert {s["modality"] for s in samples} == {"audio", "image", "text"}
    assert sorted((out / "uti").glob("*.input.wav")) and sorted((out / "uti").glob("*.decoded.png"))
    assert (out / "data" / "verify" / "report.json").exists()
    assert str(out) in stdout and "lumo demo finished" in stdout
    page = (out / "report.html").read_text()
    assert all(f"<td>{s}</td>" in page for s in stages) and "data:image/png;base64," in page and "<svg" in page
    gates = summary["gates"]  # every gate of the run, as report.html's gate table shows it
    assert {g["stage"] for g in gates} == set(stages) and all(g["pass"] for g in gates)
    assert any(g["gate"] == "VLM ablation: shuffled" and "p " in g["statistic"] for g in gates)
    problems = _console_problems(stdout + stderr) + _arrival_problems(lines)
    assert problems == [], "\n".join(problems)
    assert "[vlm] step 200/200" in stdout and "steps/s" in stdout  # rank 0's progress, once
    assert any(s.startswith("[ray] starting a local Ray") for _, s in lines)  # before its 10-20 s start


# The training stages shortened to a few steps (what they learn is tested in test_lm_base,
# test_token_lm_*, test_mmpt_train; this test reads their console): small data, a couple of evals and
# checkpoints per run, every stage-4 task from step 0, 4 golden prompts per task in the decode gate.
SHORT_TRAINING = ["demo.lm_images=48", "demo.lm_audio=24", "demo.gate_n=4",
                  "lm.train.steps=20", "lm.train.eval_every=10", "lm.train.ckpt_every=20", "lm.train.log_every=10",
                  "token_lm.train.steps=10", "token_lm.train.eval_every=5", "token_lm.train.ckpt_every=5",
                  "token_lm.train.log_every=5", "token_lm.mmpt.ramp_steps=0", "token_lm.mmpt.blend_steps=0"]


def test_demo_training_stages_console(tmp_path, sole_local_ray):
    """The lm, mmpt and generate stages, shortened (their verdicts may fail at this length; a failed
    verdict does not stop the steps after it): every step runs, the console has one line per event, and
    the generate section of report.html shows the generated media with their captions."""
    out = tmp_path / "demo"
    sets = [a for s in SHORT_TRAINING + ["demo.skip=[uti,audit,data,vlm]"] for a in ("--set", s)]
    rc, stdout, stderr, lines = _run_demo(["--out", str(out), *sets], tmp_path)
    assert rc in (0, 1), stdout[-4000:] + stderr[-4000:]
    lm = json.loads((out / "lm" / "lm_demo.json").read_text())["stages"]
    mm = json.loads((out / "mmpt" / "mmpt_demo.json").read_text())["stages"]
    assert list(lm) == ["base_lm", "token_lm", "modality_ablation", "text_invariance", "prompt_study"]
    assert list(mm) == ["train", "modality_ablation", "fidelity"]
    assert [k for k, v in {**lm, **mm}.items() if "error" in v] == []  # each ran to its verdict
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["lm", "mmpt", "generate"]
    assert "error" not in summary["stages"][2]
    problems = _console_problems(stdout + stderr) + _arrival_problems(lines)
    assert problems == [], "\n".join(problems)
    assert "lm step 20/20" in stdout and stdout.count("token-lm step 10/10") >= 2  # 3.3, stage 4
    assert stdout.count("trial ") >= 2  # the prompt study's line per finished trial
    page = (out / "report.html").read_text()
    gen = page[page.index("<h2>generate</h2>"):]
    from lumo_ray.cli.demo.run import GENERATE_PROMPTS
    for task, prompt in GENERATE_PROMPTS:  # two captioned samples per prompt, inline
        assert gen.count(f"<figcaption>{task}: {prompt} (sample") == 2
    assert gen.count("<img src=\"data:image/png;base64,") == 4 and gen.count("<audio controls src=\"data:audio/wav") == 4
    from test_report_render import CHROMIUM, render
    if CHROMIUM is None:
        return  # (the report render tests say so in their skip)
    dom = render(out / "report.html", tmp_path / "profile")["dom"]  # as a browser shows it
    imgs = {i["alt"]: i for i in dom["imgs"]}
    t2i = [f"{t}: {p} (sample {k})" for t, p in GENERATE_PROMPTS if t == "t2i" for k in (1, 2)]
    assert all(imgs[c]["nw"] == 32 and imgs[c]["box"] == [96, 96] for c in t2i)  # decoded 32 px codec images
    assert sum(1 for a in dom["audio"] if a["error"] is None and a["duration"] > 0.1) >= 4
    assert all(c in dom["text"] for c in t2i)


def test_console_check_catches_repeats_and_noise():
    assert _console_problems("a\nb\na") == []
    assert _console_problems("(RayTrainWorker pid=1) lm step 20\n(RayTrainWorker pid=1) lm step 20") != []
    assert _console_problems("x.py:1: FutureWarning: `y` is deprecated") != []


def test_arrival_check_catches_silences_colour_cpp_lines_and_stage_lines_without_time():
    ok = [(0.0, "=== [1/2] uti (elapsed 0 s) ==="), (6.0, "... still in stage uti (elapsed 6 s)"),
          (12.5, "[lm demo] base_lm: PASS in 3.0 s (elapsed 12 s)"), (13.0, "=== uti: PASS in 13.0 s (elapsed 13 s) ===")]
    assert _arrival_problems(ok) == []
    assert _arrival_problems([(0.0, "a"), (10.5, "b")]) == ["silent 10 s after: a"]
    assert _arrival_problems([(0.0, "\x1b[36m(RayTrainWorker pid=1)\x1b[0m x")])[0].startswith("ansi")
    assert _arrival_problems([(0.0, "[2026-12-07 09:21:39,739 E 1 1] core_worker.cc:2465: Actor ...")])[0].startswith("ray c++")
    assert _arrival_problems([(0.0, "=== [1/2] uti ===")]) == ["no elapsed time: === [1/2] uti ==="]
