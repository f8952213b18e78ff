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


def test_readme_is_a_guide_whose_links_resolve():
    """README.md stays short (the long tables live in docs/commands.md, the history in docs/history.md),
    every relative link of the README and docs/ names a file that is there, and no doc or help text cites
    a specification that is not in the repository."""
    import re

    assert len(REPO.joinpath("README.md").read_text().splitlines()) <= 80
    docs = [REPO / "README.md", *sorted(REPO.joinpath("docs").glob("*.md"))]
    broken = [(d.name, m.group(1)) for d in docs for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", d.read_text())
              if not m.group(1).startswith(("http://", "https://")) and not (d.parent / m.group(1)).exists()]
    assert broken == []
    cited = [p.relative_to(REPO) for d in ("lumo_ray", "pipelines", "trainers", "docs") for p in REPO.joinpath(d).rglob("*")
             if p.suffix in (".py", ".md") and "SPEC §" in p.read_text()]
    assert cited + [n for n in ["README.md"] if "SPEC §" in REPO.joinpath(n).read_text()] == []
