"""YAML configs mapped onto dataclasses, with `key=value` command-line overrides.

A config file is a flat (or nested, for nested dataclasses) YAML mapping whose keys are
the dataclass's fields. Unknown keys are errors (a typo must not be silently ignored).
Overrides use dotted keys: `optim.lr=1e-5`, parsed as YAML scalars (`true`, `3`, `[1, 2]`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Builds dataclass `cls` from a mapping, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}.")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(types)}.")
    kwargs = {}
    for key, value in data.items():
        tp = types[key]
        if _is_dataclass_type(tp) and isinstance(value, dict):
            value = from_dict(tp, value, f"{where}.{key}")
        elif isinstance(value, list) and typing.get_origin(tp) is tuple:
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif tp in (float, int) and isinstance(value, (str, int)) and not isinstance(value, bool):
            # YAML 1.1 reads '2e-5' as a string; coerce numbers to the field's type.
            try:
                value = tp(value)
            except ValueError:
                raise ValueError(f"{where}.{key}: expected {tp.__name__}, got {value!r}.") from None
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-able data (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(obj)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies `a.b=value` strings to a nested mapping (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. lr=1e-5).")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> T:
    """`cls` from defaults, then `base`, then the YAML file at `path`, then `overrides`."""
    data: dict[str, Any] = dict(base or {})
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path} does not exist (see configs/ for examples).")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping of field: value.")
        data.update(loaded)
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where=path or cls.__name__)


def save_config(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)
