"""`lumo demo` runs every stage on the tiny default and reports where the results are."""
import json
import subprocess
import sys


def test_demo_runs_all_stages(tmp_path, real_data):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "lumo_ray.cli", "demo", "--out", str(out),
                        "--set", f"audit.real_data={real_data}", "--set", "demo.images=12", "--set", "demo.audio=12",
                        # the training stages have their own tests; `lumo demo` runs them all
                        "--set", "demo.skip=[vlm,lm,mmpt,generate]"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert {"uti", "audit", "data"} <= set(stages) and all(s["pass"] for s in stages.values())
    assert stages["data"]["records"] == 24 and stages["data"]["errors"] == 0
    assert (out / "uti" / "token_space.json").exists() and list((out / "uti").glob("*.decoded.wav"))
    assert (out / "data" / "verify" / "report.json").exists()
    assert str(out) in p.stdout and "lumo demo finished" in p.stdout
    page = (out / "report.html").read_text()
    assert all(f"<td>{s}</td>" in page for s in stages) and "data:image/png;base64," in page and "<svg" in page


def test_demo_uti_stage_runs_from_any_directory_on_packaged_samples(tmp_path):
    """No ../shared beside the working directory: the real samples ship with the package."""
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "lumo_ray.cli", "demo", "--out", str(out),
                        "--set", "demo.skip=[audit,data,vlm,lm,mmpt,generate]"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    samples = json.loads((out / "uti" / "samples.json").read_text())
    assert {s["modality"] for s in samples} == {"audio", "image", "text"}
    assert sorted((out / "uti").glob("*.input.wav")) and sorted((out / "uti").glob("*.decoded.png"))
