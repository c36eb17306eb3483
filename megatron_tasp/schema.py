"""One small validator for frozen dataclass schemas (pure Python, no torch).

A schema is a frozen dataclass whose fields carry a type annotation and, in their metadata (:func:`option`),
a one-line doc, optional choices, a minimum and whether the field is required. :func:`build` turns a raw
mapping (parsed YAML) into an instance, checking every value against its annotation; :func:`describe`
turns an annotation into the words an error or the schema listing uses. Supported annotations: ``int``,
``float``, ``str``, ``bool``, ``Literal[...]``, ``list[T]`` and unions of them with ``None``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class SchemaError(ValueError):
    """A value does not fit its schema field; the message names where and what is accepted."""


def option(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None, min: float | None = None,
           required: bool = False) -> Any:
    """A schema field: its default, one-line documentation and constraints (kept in the field metadata)."""
    meta = {"doc": doc, "choices": choices, "min": min, "required": required}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def describe(tp: Any, meta: dict[str, Any]) -> str:
    """Words for what a field accepts, e.g. ``an integer (>= 1) or null``."""
    members = [m for m in _members(tp) if m is not type(None)]
    words = []
    for m in members:
        if typing.get_origin(m) is Literal:
            words.extend(repr(a) for a in typing.get_args(m))
        elif typing.get_origin(m) is list:
            inner = typing.get_args(m)[0]
            words.append("a list of " + {int: "integers", float: "numbers", str: "strings"}[inner])
        else:
            words.append(_NAMES[m])
    text = " or ".join(words)
    if meta.get("choices"):
        text = "one of " + ", ".join(map(str, meta["choices"]))
    if meta.get("min") is not None:
        text += f" (>= {meta['min']:g})"
    if type(None) in _members(tp):
        text += " or null"
    return text


def _fits(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the (non-union) annotation ``tp``; returns it normalised (ints widened to float)."""
    if typing.get_origin(tp) is Literal:
        hit = isinstance(value, str) and value.strip().lower() in typing.get_args(tp)
        return hit, value.strip().lower() if hit else value
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, list) or not value:
            return False, value
        items = [_fits(x, inner) for x in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if tp is float:
        return isinstance(value, int | float), float(value) if isinstance(value, int | float) else value
    if tp is str:
        return isinstance(value, str) and bool(value.strip()), value
    return isinstance(value, tp), value


def check_value(value: Any, tp: Any, meta: dict[str, Any], where: str) -> Any:
    """``value`` checked against annotation ``tp`` and the field's choices/minimum; raises SchemaError."""
    bad = SchemaError(f"{where} must be {describe(tp, meta)}, got {value!r}")
    members = _members(tp)
    if value is None:
        if type(None) in members:
            return None
        raise bad
    for m in (m for m in members if m is not type(None)):
        ok, out = _fits(value, m)
        if ok:
            break
    else:
        raise bad
    if meta.get("choices") and out not in meta["choices"]:
        raise bad
    if meta.get("min") is not None and isinstance(out, int | float) and not isinstance(out, bool) \
            and out < meta["min"]:
        raise bad
    return out


def build(cls: type, raw: Any, where: str) -> Any:
    """An instance of schema ``cls`` from a raw mapping; errors name ``where`` (e.g. ``file: section``)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SchemaError(f"{where} must be a mapping of fields, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise SchemaError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.metadata.get("required"):
                raise SchemaError(f"{where}.{name}: missing required field ({f.metadata['doc']})")
            continue
        values[name] = check_value(raw[name], hints[name], f.metadata, f"{where}.{name}")
    return cls(**values)


def listing(name: str, cls: type) -> list[str]:
    """Annotated YAML lines for schema ``cls`` under key ``name``: every field, its default and meaning."""
    hints = typing.get_type_hints(cls)
    lines = [f"{name}:  # {(cls.__doc__ or '').strip()}"]
    for f in dataclasses.fields(cls):
        if f.metadata.get("required"):
            default = "REQUIRED"
        else:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            default = "null" if value is None else value if isinstance(value, str) else json.dumps(value)
        lines.append(f"  {f.name}: {default}  # {describe(hints[f.name], f.metadata)}; {f.metadata['doc']}")
    return lines


__all__ = ["SchemaError", "build", "check_value", "describe", "listing", "option"]
