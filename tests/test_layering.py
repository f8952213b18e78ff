"""The house plan held by a test (docs/architecture.md): the library under lumo_ray/ never imports Ray
or the Ray jobs (pipelines/, trainers/, servers/); only the command line (lumo_ray/cli/) does; no module
imports, through any chain, a module that imports it back; and no import runs back up the layers (LAYERS).
In trainers/: a workload's modules import only their own workload's and the shared machinery (WORKLOADS),
and no function runs over MAX_LINES."""
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
    ("codec fits", ("codecs.audio_train", "codecs.vq_train")),  # the tiny codecs' fit / losses, judged by eval
    ("products", ("serving", "openai_api", "serve_guards", "batch_generate", "export", "plan", "flops",
                  "resources", "tokenize_request", "tracking")),  # what the CLI and the Ray jobs call
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


# trainers/: the machinery every workload shares, then each workload's own modules (a Tune study of a
# workload is that workload's; stage 4 is the token LM with layout "any", so it is the token LM's)
SHARED = ("context", "loop", "checkpoint", "fsdp", "metrics", "launch", "tune_resources")
WORKLOADS = {"vlm": ("vlm", "vlm_stream", "tune_vlm"), "lm": ("lm",),
             "token_lm": ("token_lm", "mmpt", "tune_study", "tune_prompts", "tune_mmpt"),
             "codec": ("codec_fit", "codec_vq", "codec_audio", "codec_clip")}
MAX_LINES = 60


def cross_workload_imports(root: Path, shared=SHARED, workloads=WORKLOADS) -> list[str]:
    """'<module> imports <module> (workload a -> b)' for each trainers/ import outside the importer's own
    workload and the shared machinery; a module in neither list is named too (place it)."""
    family = {m: w for w, ms in workloads.items() for m in ms}
    out = []
    for p in sorted(root.glob("*.py")):
        me = p.stem
        if me == "__init__" or me in shared:
            continue
        if me not in family:
            out.append(f"trainers.{me} is in no workload: add it to WORKLOADS or SHARED")
            continue
        for name in sorted(imports(p)):
            parts = name.split(".")
            if parts[0] != "trainers" or len(parts) < 2 or parts[1] in shared or parts[1] == "__init__":
                continue
            if family.get(parts[1]) != family[me]:
                out.append(f"trainers.{me} imports trainers.{parts[1]} (workload {family[me]} -> "
                           f"{family.get(parts[1], 'none')})")
    return sorted(set(out))


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """'<file>:<function> N lines' for each function (methods too) longer than `limit`."""
    out = []
    for p in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{p.name}:{node.name} {n} lines")
    return out


def test_a_trainer_imports_only_its_own_workload_and_the_shared_machinery():
    assert cross_workload_imports(REPO / "trainers") == []


def test_no_function_in_trainers_runs_over_60_lines():
    assert long_functions(REPO / "trainers") == []


def test_the_trainer_checks_catch_a_cross_import_an_unplaced_module_and_a_long_function(tmp_path, monkeypatch):
    root = tmp_path / "trainers"
    root.mkdir()
    (root / "loop.py").write_text("")
    (root / "vlm.py").write_text("from .token_lm import x\nfrom .loop import y\n")
    (root / "token_lm.py").write_text("def f():\n" + "    x = 1\n" * 60)
    (root / "new.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)  # imports() names modules relative to REPO
    assert cross_workload_imports(root, ("loop",), {"vlm": ("vlm",), "token_lm": ("token_lm",)}) == [
        "trainers.new is in no workload: add it to WORKLOADS or SHARED",
        "trainers.vlm imports trainers.token_lm (workload vlm -> token_lm)"]
    assert long_functions(root) == ["token_lm.py:f 61 lines"]
