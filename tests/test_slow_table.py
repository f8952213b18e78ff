"""conftest.py's SLOW table names real tests: every file exists and every name is a test function of it
(a module-level `test_*` or one in a `Test*` class) or one parameter's full id (`test_x[verify]`). A
stale name would mark nothing and leave a slow test in the fast tier without a word. The files are read,
not imported (importing them pulls in torch and Ray: 6 s of CPU); a parameter id that cannot be read
off a literal `parametrize` is left to pytest's own collection of that file."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import SLOW

TESTS = Path(__file__).resolve().parent


def _is_parametrize(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "parametrize"


def _idval(v) -> str | None:
    """pytest's id of one literal parameter value (None: pytest would number it instead)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return str(v)
    return None


def _literal_ids(dec: ast.Call, consts: dict[str, ast.expr]) -> list[str] | None:
    """The ids of a `@pytest.mark.parametrize(names, values[, ids=...])` whose values are literals (or a
    module-level name bound to them); None where only pytest can tell."""
    kw = {k.arg: k.value for k in dec.keywords}
    if "ids" in kw:
        try:
            return [str(i) for i in ast.literal_eval(kw["ids"])]
        except ValueError:
            return None
    values = dec.args[1] if len(dec.args) > 1 else kw.get("argvalues")
    if isinstance(values, ast.Name):
        values = consts.get(values.id)
    if not isinstance(values, (ast.List, ast.Tuple)):
        return None
    ids = []
    for el in values.elts:
        if isinstance(el, ast.Call) and getattr(el.func, "attr", None) == "param":  # pytest.param(..., id=...)
            given = next((k.value for k in el.keywords if k.arg == "id"), None)
            if not isinstance(given, ast.Constant):
                return None
            ids.append(str(given.value))
            continue
        try:
            v = ast.literal_eval(el)
        except ValueError:
            return None
        parts = [_idval(x) for x in (v if isinstance(v, tuple) else (v,))]
        if None in parts:
            return None
        ids.append("-".join(parts))
    return ids


def _read_tests(path: Path) -> tuple[set[str], set[str]]:
    """(test names, full parameter ids) of a test file, as far as its source tells: the ids of a test
    parametrized other than by literals are not read here (_collected_ids has them)."""
    tree = ast.parse(path.read_text(), str(path))
    consts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}
    funcs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    funcs += [m for c in tree.body if isinstance(c, ast.ClassDef) and c.name.startswith("Test")
              for m in c.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    names, ids = set(), set()
    for f in funcs:
        if not f.name.startswith("test"):
            continue
        names.add(f.name)
        decs = [d for d in f.decorator_list if _is_parametrize(d)]
        if len(decs) == 1 and (got := _literal_ids(decs[0], consts)) is not None:
            ids.update(f"{f.name}[{i}]" for i in got)
    return names, ids


def _collected_ids(path: Path) -> set[str]:
    """The test ids pytest collects in `path` (slow: imports the module)."""
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                        str(path)], capture_output=True, text=True, timeout=300, cwd=TESTS.parent)  # (-qq: counts only)
    return {m.group(1) for m in re.finditer(r"::(?:\w+::)?(\S+)$", p.stdout, re.M)}


def test_every_slow_entry_names_a_test_of_its_file():
    stale = []
    for file, entries in SLOW.items():
        path = TESTS / file
        if not path.is_file():
            stale.append(f"{file}: no such test file")
            continue
        names, ids = _read_tests(path)
        assert names, f"{file}: no test functions read"
        for entry in sorted(entries - {"*"}):
            base = entry.split("[", 1)[0]
            if base not in names:
                stale.append(f"{file}: no test {base}")
            elif "[" in entry and entry not in ids and entry not in _collected_ids(path):
                stale.append(f"{file}: {base} has no parameter id {entry[len(base):]}")
    assert not stale, "stale names in tests/conftest.py's SLOW table:\n" + "\n".join(stale)


def test_the_reader_finds_parameter_ids_and_stale_names(tmp_path):
    """The reader itself, on a file of known tests: plain, in a class, parametrized three ways."""
    f = tmp_path / "test_probe.py"
    f.write_text('import pytest\nJOBS = ["normalize", "verify"]\n\n\n'
                 'def test_plain():\n    pass\n\n\n'
                 '@pytest.mark.parametrize("job", JOBS)\ndef test_named(job):\n    pass\n\n\n'
                 '@pytest.mark.parametrize("a,b", [(1, "x"), pytest.param(2, "y", id="two")])\ndef test_pairs(a, b):\n'
                 '    pass\n\n\nclass TestGroup:\n    def test_method(self):\n        pass\n\n'
                 '    def helper(self):\n        pass\n')
    names, ids = _read_tests(f)
    assert names == {"test_plain", "test_named", "test_pairs", "test_method"}
    assert ids == {"test_named[normalize]", "test_named[verify]", "test_pairs[1-x]", "test_pairs[two]"}
