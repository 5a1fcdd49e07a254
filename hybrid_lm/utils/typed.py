"""Strict conversion between plain dicts (parsed YAML) and typed dataclasses.

Unknown keys, wrong types and missing required fields raise `ValueError` naming the file, the key and the value,
and listing the valid keys. Used for model configs and training configs alike. A dataclass that passes settings
through to code it does not know (fla's layers, `layers/fla_mixers.py`) may mark one `dict` field with
`metadata={"extra_keys": True}`: unknown keys then land in that field (the owner validates them), and `to_dict`
writes them back flat.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, key)
            except ValueError:
                continue
        raise ValueError(f"{where}: key '{key}' = {value!r} must be {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: key '{key}' = {value!r} must be a list")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: key '{key}' = {value!r} must be a mapping")
        _, arg = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, arg, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: key '{key}' = {value!r} must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, where, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: key '{key}' = {value!r} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: key '{key}' = {value!r} must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: key '{key}' = {value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: key '{key}' = {value!r} must be a string")
        return value
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{where}: key '{key}' = {value!r} is not valid; choose one of {list(choices)}")
        return value
    return value


def _extra_keys_field(cls: type) -> str | None:
    """The field collecting keys the dataclass does not name (see the module docstring), if it has one."""
    return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("extra_keys")), None)


def from_dict(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, strictly."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    extra = _extra_keys_field(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != extra}
    unknown = [k for k in data if k not in fields]
    if unknown and extra is None:
        raise ValueError(f"{where}: unknown key '{prefix}{unknown[0]}' = {data[unknown[0]]!r}; "
                         f"valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], where, prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where}: missing required key '{prefix}{name}'")
    if extra is not None:
        kwargs[extra] = {k: data[k] for k in unknown}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (recursively), keeping field order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        extra = _extra_keys_field(type(obj))
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != extra}
        return {**out, **to_dict(getattr(obj, extra))} if extra is not None else out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
