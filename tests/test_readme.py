"""The README's first commands are the ones CI runs."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = REPO.joinpath("README.md").read_text().splitlines()
    ci = REPO.joinpath(".ci", "run").read_text().splitlines()
    test_cmd = ci[-1].strip()
    assert test_cmd in [l.strip() for l in readme[:30]], "README must open with the CI test command"
    assert any("lumo demo" in l for l in readme[:30])
    assert "torch==2.13.0" in test_cmd and "torchaudio" not in test_cmd
