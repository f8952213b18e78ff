"""The house plan held by a test (docs/architecture.md): the library under lumo_ray/ never imports Ray
or the Ray jobs (pipelines/, trainers/, servers/); only the command line (lumo_ray/cli/) does; and no module
imports, through any chain, a module that imports it back."""
from __future__ import annotations

import ast
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
JOBS = ("ray", "pipelines", "trainers", "servers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (lazy imports inside functions too),
    relative imports resolved."""
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def library_files() -> list[Path]:
    return [p for p in sorted((REPO / "lumo_ray").rglob("*.py")) if "cli" not in p.relative_to(REPO / "lumo_ray").parts[:1]]


def layering_violations(files: list[Path]) -> list[str]:
    return [f"{module_name(p)} imports {m}" for p in files for m in sorted(imports(p))
            if m.split(".")[0] in JOBS or m.startswith("lumo_ray.cli")]


def cycles(files: list[Path]) -> list[list[str]]:
    """Import circles among our modules (a package's own __init__ re-exporting its modules aside)."""
    names = {module_name(p): p for p in files}
    graph = {n: {m for m in imports(p) if m in names and m != n and not n.startswith(m + ".")}
             for n, p in names.items()}
    found, state = [], {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    return found


def all_files() -> list[Path]:
    return [p for d in ("lumo_ray", "pipelines", "trainers", "servers") for p in sorted((REPO / d).rglob("*.py"))]


def test_the_library_imports_neither_ray_nor_the_jobs():
    assert len(library_files()) > 40
    assert layering_violations(library_files()) == []


def test_no_import_circle():
    assert cycles(all_files()) == []


def test_the_checks_catch_a_library_module_that_imports_ray_and_a_circle(tmp_path, monkeypatch):
    lib = tmp_path / "lumo_ray"
    (lib / "eval").mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "eval" / "__init__.py").write_text("")
    (lib / "eval" / "a.py").write_text("def f():\n    import ray.data\n    from ..storage import x\n")
    (lib / "storage.py").write_text("from .eval.a import f\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    files = sorted(lib.rglob("*.py"))
    assert layering_violations(files) == ["lumo_ray.eval.a imports ray.data"]
    assert cycles(files) == [["lumo_ray.eval.a", "lumo_ray.storage", "lumo_ray.eval.a"]]
