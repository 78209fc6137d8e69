"""Settings validated by pydantic: YAML config files and `key=value` overrides onto config
dataclasses, and the field types every command shares.

A config file is a flat (or nested, for nested dataclasses) YAML mapping whose keys are
the dataclass's fields. Unknown keys are errors (a typo must not be silently ignored).
Overrides use dotted keys: `optim.lr=1e-5`, parsed as YAML scalars (`true`, `3`, `[1, 2]`).
Config classes are `@config_dataclass`es: plain dataclasses whose construction and
assignment are validated, so a flag set on a config is checked like a YAML value. Every
error names the key, the value and what would be accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Annotated, Any, Callable, Sequence, TypeVar

import pydantic
import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

T = TypeVar("T")

_CONFIG = ConfigDict(extra="forbid", validate_assignment=True)


def config_dataclass(cls: type[T]) -> type[T]:
    """A dataclass validated on construction and assignment; unknown keys are refused."""
    return pydantic.dataclasses.dataclass(config=_CONFIG)(cls)


def _one_or_many(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


def _mesh_size(value: int) -> int:
    if value == 0:
        raise ValueError("a mesh size must be >= 1, or -1 for all remaining devices")
    return value


# Field types shared by the configs, the command-line flags (`check_flags`) and, later, request bodies:
Text = Annotated[str, Field(min_length=1)]  # an empty stop string would end every completion at once
Texts = Annotated[tuple[Text, ...], BeforeValidator(_one_or_many)]  # a single string is one item, not its characters
Finite = Annotated[float, Field(allow_inf_nan=False)]  # NaN/inf would train or decode silently wrong
Positive = Annotated[int, Field(ge=1)]  # counts and sizes
NonNegative = Annotated[int, Field(ge=0)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # seconds, memory sizes
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # a share in (0, 1]
MeshSize = Annotated[int, Field(ge=-1), AfterValidator(_mesh_size)]  # >= 1, or -1: the remaining devices

Where = str | Callable[[tuple], str]  # how an error names a key: a prefix, or a function of its location


def from_dict(cls: type[T], data: Any, where: Where = "config") -> T:
    """Builds config dataclass `cls` from a mapping (nested dataclasses from nested
    mappings); a ValueError names every bad key, its value and the fix."""
    if not isinstance(data, dict):
        raise ValueError(f"{_path(where, ())}: expected a mapping of {cls.__name__} fields, got {data!r}.")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as err:
        raise ValueError(describe(err, cls, where)) from None


def replace(cfg: T, where: str = "--", **changes: Any) -> T:
    """`dataclasses.replace` on a config dataclass, with errors described like a file's
    (by default naming each key as the command-line flag that set it)."""
    try:
        return dataclasses.replace(cfg, **changes)
    except ValidationError as err:
        raise ValueError(describe(err, type(cfg), where)) from None


def _field_class(cls: Any, loc: Sequence[Any]) -> Any:
    """The dataclass at `loc` inside `cls` (None where `loc` leaves the dataclasses)."""
    for key in loc:
        if not dataclasses.is_dataclass(cls):
            return None
        tp = typing.get_type_hints(cls).get(str(key))
        cls = next((a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)), tp)
    return cls if dataclasses.is_dataclass(cls) else None


def check_flags(args: argparse.Namespace, cls: type[T]) -> T:
    """The command-line flags named by `cls`'s fields, validated by their types (flags left
    unset keep the field's default); a ValueError names each bad flag, its value and what
    would be accepted."""
    names = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {k: v for k, v in vars(args).items() if k in names and v is not None}, where="--")


def _path(where: Where, loc: Sequence[Any]) -> str:
    """`file.yaml.optim.lr`, `config.stop[0]`, or a command-line flag (`where='--'`): `--top-p`."""
    if callable(where):
        return where(tuple(loc))
    if where == "--" and loc:
        return "--" + str(loc[0]).replace("_", "-") + "".join(f"[{k}]" for k in loc[1:])
    return where + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc)


def describe(err: ValidationError, cls: Any, where: Where) -> str:
    """One line per problem of a pydantic error: the key path, what is wrong, the fix."""
    unknown: dict[tuple, list[str]] = {}
    lines = []
    for e in err.errors():
        loc, kind, value = tuple(e["loc"]), e["type"], e.get("input")
        if kind == "unexpected_keyword_argument":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        if kind == "int_from_float":
            message = f"expected a whole number, got {value!r}"
        elif kind == "bool_parsing" or kind == "bool_type":
            message = f"expected true or false, got {value!r}"
        elif kind == "dataclass_type":
            holder = getattr(_field_class(cls, loc), "__name__", "fields")
            message = f"expected a mapping of {holder} fields, got {value!r}"
        elif kind == "value_error" and e.get("ctx", {}).get("error") is not None:
            message = f"{e['ctx']['error']}, got {value!r}"
        elif kind == "string_too_short" and value == "":
            message = "expected a non-empty string, got ''"
        elif kind == "string_type" and isinstance(value, (dict, list)):
            message = (f"expected a string, got {value!r}. YAML read braces as a mapping: quote the value, "
                       "e.g. key='\"{question}\"'")
        else:
            message = f"{e['msg'][0].lower()}{e['msg'][1:]}, got {value!r}"
        lines.append(f"{_path(where, loc)}: {message}.")
    for loc, keys in unknown.items():
        holder = _field_class(cls, loc)
        valid = f"; valid keys: {sorted(f.name for f in dataclasses.fields(holder))}" if holder else ""
        if callable(where):  # each key may come from another source (a file or a --set)
            lines += [f"{_path(where, (*loc, key))}: unknown key{valid}." for key in sorted(keys)]
        else:
            lines.append(f"{_path(where, loc)}: unknown key(s) {sorted(keys)}{valid}.")
    return " ".join(lines)


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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); quote it "
                             f"as text ({key}='\"...\"') or fix the brackets.") from None
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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'expected ',' or ']' at line 2, column 9' (no echo of the text around it)."""
    problem = getattr(err, "problem", None) or "syntax error"
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml(path: str) -> Any:
    """The YAML document at `path`; a syntax error or an unreadable file is a ValueError
    naming the file, the line and the column."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist (see configs/ for examples).")
    if os.path.isdir(path):
        raise ValueError(f"config file {path} is a directory; pass a YAML file.")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {_yaml_problem(err)}.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file; pass a YAML config.") from None


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> T:
    """`cls` from defaults, then `base`, then the YAML file at `path`, then `overrides`.
    An error names a key set by an override as `--set KEY`, any other by the file's path."""
    data: dict[str, Any] = dict(base or {})
    if path:
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping of field: value.")
        data.update(loaded)
    data = apply_overrides(data, overrides)
    overridden = [tuple(item.split("=", 1)[0].strip().split(".")) for item in overrides]
    source = path or cls.__name__

    def where(loc: tuple) -> str:
        keys = tuple(str(k) for k in loc)
        if any(keys[:len(o)] == o or o[:len(keys)] == keys for o in overridden if keys):
            return "--set " + str(loc[0]) + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc[1:])
        return _path(source, loc)

    return from_dict(cls, data, where=where)


def save_config(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)
