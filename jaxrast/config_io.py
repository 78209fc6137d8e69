"""YAML configs mapped onto dataclasses, with `key=value` command-line overrides.

A config file is a flat (or nested, for nested dataclasses) YAML mapping whose keys are
the dataclass's fields. Unknown keys are errors (a typo must not be silently ignored).
Overrides use dotted keys: `optim.lr=1e-5`, parsed as YAML scalars (`true`, `3`, `[1, 2]`).
"""

from __future__ import annotations

import dataclasses
import os
import types
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
    """Builds dataclass `cls` from a mapping, recursing into nested dataclass fields.
    Every value is checked against its field's type (see `coerce`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}.")
    fields = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}.")
    return cls(**{key: coerce(fields[key], value, f"{where}.{key}") for key, value in data.items()})


def coerce(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed YAML) as type `tp`, or a ValueError naming the key and the fix.

    Numbers written as strings ('2e-5', which YAML 1.1 reads as a string) become numbers;
    an integral float fills an int field, any other float does not; bools must be
    true/false; a single string fills a tuple-of-strings field as one element (not one per
    character); lists become tuples.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(option, value, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}.")
    if tp in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value) if tp is float else int(value)
            except ValueError:
                raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}.") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}.")
        if tp is int:
            if number != int(number):
                raise ValueError(f"{where}: expected a whole number, got {value!r}.")
            return int(number)
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        hint = (" YAML read braces as a mapping: quote the value, e.g. key='\"{question}\"'"
                if isinstance(value, (dict, list)) else "")
        raise ValueError(f"{where}: expected a string, got {value!r}.{hint}")
    if origin is tuple:
        item = args[0] if args else Any
        if isinstance(value, str) and item is str:
            return (value,)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r}).")
        return tuple(coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))) if args \
            else tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}.")
        if len(args) == 2:
            return {k: coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return value
    return value


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
        if value is None and raw.strip() not in ("null", "~", "Null", "NULL"):
            value = raw  # '#2' is a YAML comment, not null: keep the text
        node = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part) or {}, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is a value, not a section.")
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
