"""The house plan held by a test (docs/architecture.md): the library under lumo_ray/ never imports Ray
or the Ray jobs (pipelines/, trainers/, servers/); only the command line (lumo_ray/cli/) does; no module
imports, through any chain, a module that imports it back; and no import runs back up the layers (LAYERS)."""
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


# The library's layers, lowest first: a module imports only from its own layer or the ones below, at module
# level or inside a function. A layer is named by its packages and top-level modules (a longer name, such as
# a module inside a package, takes precedence over its package); every module of lumo_ray/ is in one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("errors",)),                                  # the one-line user error every layer raises
    ("storage", ("storage", "packaged", "runtime")),          # where files live, shipped files, thread helpers
    ("config", ("config",)),                                  # typed sections, YAML + --set loader
    ("identity", ("integrity", "token_space")),              # folders that prove themselves, the token-space ABI
    ("codecs", ("codecs",)),                                  # text/audio/image adapters, CLIP, k-means codebooks
    ("models", ("models", "onnx_lm")),                        # the networks (VLM, token LM, base LM), ONNX stand-in
    ("uti", ("uti",)),                                        # adapters and token space built from a config
    ("data", ("data",)),                                      # manifests, readers, shards, sequences, synthetic data
    ("embed", ("embed",)),                                    # CLIP embeddings of a manifest, dedup, k-means parts
    ("generate", ("generate", "generate_text")),              # load a run, constrained generation, decode media
    ("eval", ("eval",)),                                      # metrics, probes, ablations, gates, audit, report
    ("codec fits", ("codecs.audio_train", "codecs.vq_train")),  # the tiny codecs' fits: on data.synth, judged by eval
    ("products", ("serving", "openai_api", "serve_guards", "batch_generate", "export", "plan", "flops",
                  "resources", "tracking")),                  # what the CLI and the Ray jobs call
    ("cli", ("cli",)),                                        # the `lumo` command: the only one that imports the jobs
]


def layer_of(module: str, layers: list | None = None) -> int | None:
    """Index in `layers` of the longest layer name `module` is or lies under (None: in no layer)."""
    best, found = -1, None
    for i, (_, names) in enumerate(layers or LAYERS):
        for n in names:
            full = f"lumo_ray.{n}"
            if (module == full or module.startswith(full + ".")) and len(full) > best:
                best, found = len(full), i
    return found


def upward_imports(files: list[Path], layers: list | None = None) -> list[str]:
    """Every import, at any depth of the code, from a module to one in a higher layer; and every module in no layer."""
    layers = layers or LAYERS
    out = []
    for p in files:
        name = module_name(p)
        here = layer_of(name, layers)
        if here is None:
            if name != "lumo_ray":
                out.append(f"{name} is in no layer: add it to LAYERS")
            continue
        # `from ..eval import metrics` names lumo_ray.eval and lumo_ray.eval.metrics: keep the module imported
        targets = {source_module(m) for m in imports(p) if m.startswith("lumo_ray.")}
        for m in sorted(t for t in targets if not any(u.startswith(t + ".") for u in targets)):
            there = layer_of(m, layers)
            if there is not None and there > here:
                out.append(f"{name} imports {m} (layer {layers[there][0]} above layer {layers[here][0]})")
    return out


def source_module(name: str) -> str:
    """The module a dotted import name lies in (`lumo_ray.eval.metrics.psnr` -> `lumo_ray.eval.metrics`)."""
    parts = name.split(".")
    while len(parts) > 1:
        path = REPO.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            break
        parts.pop()
    return ".".join(parts)


def all_files() -> list[Path]:
    return [p for d in ("lumo_ray", "pipelines", "trainers", "servers") for p in sorted((REPO / d).rglob("*.py"))]


def test_the_library_imports_neither_ray_nor_the_jobs():
    assert len(library_files()) > 40
    assert layering_violations(library_files()) == []


def test_no_import_circle():
    assert cycles(all_files()) == []


def test_no_import_runs_up_the_layers():
    assert upward_imports(sorted((REPO / "lumo_ray").rglob("*.py"))) == []


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


def test_the_layer_check_catches_an_import_up_and_a_module_in_no_layer(tmp_path, monkeypatch):
    lib = tmp_path / "lumo_ray"
    (lib / "codecs").mkdir(parents=True)
    (lib / "eval").mkdir()
    for f in ("__init__.py", "codecs/__init__.py", "eval/__init__.py", "eval/metrics.py", "storage.py", "extra.py"):
        (lib / f).write_text("")
    (lib / "codecs" / "vq.py").write_text("from ..storage import x\n\ndef f():\n    from ..eval import metrics\n")
    (lib / "codecs" / "fit.py").write_text("from ..eval.metrics import psnr\n")
    (lib / "eval" / "audit.py").write_text("from ..codecs.fit import y\nfrom ..codecs import vq\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    layers = [("storage", ("storage",)), ("codecs", ("codecs",)), ("eval", ("eval",)), ("fits", ("codecs.fit",))]
    assert upward_imports(sorted(lib.rglob("*.py")), layers) == [
        "lumo_ray.codecs.vq imports lumo_ray.eval.metrics (layer eval above layer codecs)",
        "lumo_ray.eval.audit imports lumo_ray.codecs.fit (layer fits above layer eval)",
        "lumo_ray.extra is in no layer: add it to LAYERS"]
