"""Typed configs to and from plain data: dicts, JSON, TOML recipes and `key=value` overrides.

Precedence, as the CLI applies it: dataclass defaults < recipe file < `key=value` arguments.
Keys are dotted paths through nested dataclasses (`model.moe.num_routed=8`); values are parsed by
the field's declared type, so a typo or a wrong type is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_NONE = ("none", "null")


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as JSON-able data: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Coerce plain data `value` to type `tp` (dataclass, tuple, int, float, bool, str)."""
    tp, optional = _strip_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in _NONE and tp is not str):
        if optional:
            return None
        raise ValueError(f"{key} cannot be none")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a table of fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if typing.get_origin(tp) is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        items = value.split(",") if isinstance(value, str) else value
        return tuple(
            _convert(item, v.strip() if isinstance(v, str) else v, key)
            for v in items
            if not (isinstance(v, str) and not v.strip())
        )
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value else int(value)
        if tp is float:
            return float(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a valid {tp.__name__}") from None
    return value if tp is Any else str(value)


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown field(s) {[prefix + k for k in unknown]}; "
            f"known: {sorted(prefix + n for n in names)}"
        )
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{prefix or cls.__name__}: {e}") from e


def apply_overrides(obj: Any, overrides: Mapping[str, Any]) -> Any:
    """Return `obj` with dotted-path overrides applied (values as strings or plain data)."""
    for key, value in overrides.items():
        obj = _set(obj, key.split("."), value, key)
    return obj


def _set(obj: Any, path: list[str], value: Any, key: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(
            f"cannot set {key}: {'.'.join(path)} is not inside a config section "
            "(set the section first, or it is none)"
        )
    fields = {f.name for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in fields:
        raise ValueError(f"unknown key {key!r}: {type(obj).__name__} has {sorted(fields)}")
    hints = typing.get_type_hints(type(obj))
    if len(path) == 1:
        new = _convert(hints[name], value, key)
    else:
        new = _set(getattr(obj, name), path[1:], value, key)
    return dataclasses.replace(obj, **{name: new})


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`["a.b=1", "c=x"]` -> `{"a.b": "1", "c": "x"}`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad override {item!r}: use key=value")
        out[key.strip()] = value.strip()
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables -> dotted keys (TOML sections become path prefixes)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A TOML recipe as dotted keys."""
    path = Path(path)
    try:
        return flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ValueError(f"recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path} is not valid TOML: {e}") from e
