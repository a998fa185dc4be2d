"""Strict dataclass configs: YAML files plus dotted command-line overrides.

Every component owns a dataclass (``ModelConfig``, ``DataConfig`` ...) whose fields carry a
docstring-style comment. This module only knows how to turn plain mappings into those
dataclasses, rejecting unknown keys and wrong types with the full dotted path of the offending
key, so a typo in a 200-GPU job fails on the login node, not after the model has loaded.

    cfg = load_config(JobConfig, ["run.yaml"], ["optim.lr=3e-4", "data.tasks=[rte,cb]"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from hp_deepspeed.errors import ConfigError

T = TypeVar("T")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def one_line(message: str) -> str:
    """``message`` as the single line a user sees for bad input (``hp_deepspeed.cli`` prints it):
    line breaks of multi-part messages become "; " so a log grep or a batch job's tail shows it whole."""
    parts = [part.strip() for part in str(message).splitlines()]
    parts = [part[2:] if part.startswith("- ") else part for part in parts if part]  # list bullets
    return "; ".join(parts).replace(":;", ":")


def yaml_error(where: str, err: yaml.YAMLError, file: bool = True) -> ConfigError:
    """A YAML syntax error as one line: file, line, column (when ``file``), what was expected."""
    mark = getattr(err, "problem_mark", None)
    position = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None and file else where
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return ConfigError(f"{position}: invalid YAML: {problem}" + (f" ({context})" if context else ""))


def _type_name(tp: Any) -> str:
    """How an annotation reads in an error: ``bool | Literal["auto"]`` as ``true/false or 'auto'``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in typing.get_args(tp) if arg is not type(None)]
        if type(None) in typing.get_args(tp):
            names.append("null")
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(tp))
    if tp is bool:
        return "true/false"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:  # the union's own message below names every choice
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, Sequence, typing.Sequence) or tp in (list,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{where}.<key>"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept exactly that spelling of a number.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; {cls.__name__} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], path)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None
    except ConfigError:
        raise
    except ValueError as err:
        # A section's __post_init__ range check: its message already names the dotted key.
        raise ConfigError(str(err)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (what is written next to runs and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(tree: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key segment")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise yaml_error(f"override {override!r}", err, file=False) from None


def merge(base: dict, extra: Mapping) -> dict:
    """Deep-merge ``extra`` into ``base`` (mappings merge, everything else replaces)."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise yaml_error(f"config file {path}", err) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Merge YAML ``files`` in order, apply ``overrides``, and validate into ``cls``."""
    tree: dict = {}
    for path in files:
        merge(tree, read_yaml(path))
    for override in overrides:
        apply_override(tree, override)
    return from_dict(cls, tree)


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
