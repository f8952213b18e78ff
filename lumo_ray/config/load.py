"""Typed loading: a dataclass from YAML with dotted `--set` overrides.

Every field is typed; `load_config` refuses unknown keys and wrong types with an error that names
the key, the file and the valid keys. `dump_config` writes the resolved config into a run directory
(a path or an object-store URI).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the typed schema."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, src)
            except ConfigError as e:
                errors.append(str(e))
        # a value shaped like one member (a list of mappings) is better told what is wrong inside it
        inner = [m for m in errors if f"'{key}[" in m or f"'{key}." in m]
        raise ConfigError(inner[0] if inner else f"{src}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{src}: key '{key}': {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, src, prefix=key + ".")
    if origin in (list, typing.List):
        if not isinstance(value, list):
            raise ConfigError(f"{src}: key '{key}': expected a list, got {value!r}")
        (inner,) = args or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: key '{key}': expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: key '{key}': expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: key '{key}': expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{src}: key '{key}': expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{src}: key '{key}': expected str, got {value!r}")
    raise ConfigError(f"{src}: key '{key}': unsupported type {_type_name(tp)}")


def build(cls: type[T], data: dict, src: str = "<dict>", prefix: str = "") -> T:
    """A typed `cls` from plain data (a parsed YAML mapping); `src` names where it came from in errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            near = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"{src}: unknown key '{prefix}{k}'{hint}; valid keys at this level: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], prefix + k, src)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], yaml-parsed c)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def set_item(key: str, value: Any) -> str:
    """The `--set` item giving `key` exactly `value`: JSON, which the --set parser reads as YAML, so a path
    with spaces or '#' stays one string and a list stays a list."""
    return f"{key}={json.dumps(value)}"


def file_sets(path: str | Path) -> list[str]:
    """A YAML config file as `--set` items (`a.b=<JSON value>`, leaves in file order): a recipe file
    applied over another config (`lumo demo` puts its recipes over --config)."""
    data = _read_yaml(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    out: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out.append(set_item(f"{prefix}{k}", v))
    walk(data, "")
    return out


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a section")
        node[path[-1]] = value
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nearest_path(p: Path) -> Path | None:
    """The existing path the user most likely meant by a missing `p` (tiny.yml -> tiny.yaml,
    configs/locl/x.yaml -> configs/local/x.yaml): each missing part replaced by its closest sibling."""
    parts, i = p.parts, 0
    while i < len(parts) and Path(*parts[:i + 1]).exists():
        i += 1
    here = Path(*parts[:i]) if i else Path(".")
    for part in parts[i:]:
        if not here.is_dir():
            return None
        names = [c.name for c in here.iterdir()]
        close = difflib.get_close_matches(part, names, n=1, cutoff=0.6) or \
            [n for n in names if n.split(".")[0] == part.split(".")[0]][:1]
        if not close:
            return None
        here = here / close[0]
    return here if here.exists() and here != p else None


def _read_yaml(p: Path) -> Any:
    """A config file's parsed YAML, or a ConfigError saying what is wrong with the file."""
    if not p.exists():
        guess = nearest_path(p)
        raise ConfigError(f"config file not found: {p}" + (f"; did you mean {guess}?" if guess else
                                                           "; give the path of a YAML config (see configs/)"))
    if p.is_dir():
        yamls = sorted(p.glob("*.yaml"))
        raise ConfigError(f"config file {p} is a directory; give a YAML file" + (f", e.g. {yamls[0]}" if yamls else ""))
    try:
        return yaml.safe_load(p.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not text; give a YAML config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where} ({getattr(e, 'problem', None) or e}); "
                          "fix it or give another config") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (or defaults when path is None) and apply `--set` overrides.
    `defaults` (KEY=VALUE items) sit between the dataclass defaults and the file: a command's own
    defaults (e.g. `lumo train mmpt` trains LoRA), which the file and --set still override."""
    src = str(path) if path else "<defaults>"
    data: dict = {}
    if path:
        data = _read_yaml(Path(path))
        if not isinstance(data, dict):
            raise ConfigError(f"{src}: top level must be a mapping")
    if defaults:
        data = _deep_merge(merge_overrides({}, defaults), data)
    if overrides:
        src = f"{src} (with --set {' '.join(overrides)})"
    data = merge_overrides(data, overrides or [])
    return build(cls, data, src)


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def dump_config(cfg: Any, out_dir: Any, name: str = "config.yaml") -> Any:
    """Write the resolved config into the run directory (a path, or an object-store URI); returns
    the file's Path when local, else its URI."""
    from ..storage import locate, where

    out = locate(out_dir)
    if out.is_local:
        out.local.mkdir(parents=True, exist_ok=True)
    p = out / name
    p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return where(p)
