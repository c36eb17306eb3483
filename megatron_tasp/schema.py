"""One small validator for frozen dataclass schemas, shared by fine-tuning recipes and topology files
(pure Python, no torch; imports nothing from megatron_tasp, so every layer may use it).

A schema is a frozen dataclass whose fields carry a type annotation and, in their metadata (:func:`option`),
a one-line doc, optional choices, a minimum (``min``: inclusive, ``gt``: exclusive) and whether the field is
required. :func:`build` turns a raw mapping (parsed YAML) into an instance, checking every value against its
annotation and rejecting unknown keys; :func:`describe` turns an annotation into the words an error or the
schema listing uses. Supported annotations: ``int``, ``float`` (an integer is accepted and widened),
``str`` (not blank), ``bool`` (only true/false: never a number, and a bool is never a number),
``Literal[...]``, ``list[T]``, a nested schema dataclass (a mapping of its fields) and unions of them with
``None``.

Errors read ``WHERE: PATH.FIELD must be ..., got ...``: ``where`` names the file, ``path`` the dotted
section (empty for fields at the top of a document).
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
           gt: float | None = None, required: bool = False) -> Any:
    """A schema field: its default, one-line documentation and constraints (kept in the field metadata).

    ``min`` is an inclusive lower bound, ``gt`` an exclusive one (``gt=0``: strictly positive)."""
    meta = {"doc": doc, "choices": choices, "min": min, "gt": gt, "required": required}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _nested(tp: Any) -> type | None:
    """The schema dataclass among the members of ``tp`` (a nested section), or None."""
    found = [m for m in _members(tp) if isinstance(m, type) and dataclasses.is_dataclass(m)]
    if found and len([m for m in _members(tp) if m is not type(None)]) > 1:
        raise TypeError(f"a nested schema cannot be in a union with other types: {tp}")
    return found[0] if found else None


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
        elif isinstance(m, type) and dataclasses.is_dataclass(m):
            words.append("a mapping of fields")
        else:
            words.append(_NAMES[m])
    text = " or ".join(words)
    if meta.get("choices"):
        text = "one of " + ", ".join(map(str, meta["choices"]))
    if meta.get("min") is not None:
        text += f" (>= {meta['min']:g})"
    if meta.get("gt") is not None:
        text += f" (> {meta['gt']:g})"
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


def _in_range(value: Any, meta: dict[str, Any]) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return True
    if meta.get("min") is not None and value < meta["min"]:
        return False
    return meta.get("gt") is None or value > meta["gt"]


def check_value(value: Any, tp: Any, meta: dict[str, Any], where: str) -> Any:
    """``value`` checked against annotation ``tp`` and the field's choices/bounds; raises SchemaError."""
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
    if not _in_range(out, meta):
        raise bad
    return out


def build(cls: type, raw: Any, where: str, path: str = "") -> Any:
    """An instance of schema ``cls`` from a raw mapping (None = empty); nested schema fields are built from
    their own mappings. Errors name ``where`` (the file) and the dotted ``path`` of the section ("" = the
    top of the document), e.g. ``r.yaml: model.num_layers must be an integer (>= 1), got 0``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        what = path or "the document"
        raise SchemaError(f"{where}: {what} must be a mapping of fields, got {type(raw).__name__}")
    here = f"{where}: {path}:" if path else f"{where}:"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise SchemaError(f"{here} unknown field(s) {', '.join(map(str, unknown))}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        at = f"{path}.{name}" if path else name
        if name not in raw:
            if f.metadata.get("required"):
                raise SchemaError(f"{where}: {at}: missing required field ({f.metadata['doc']})")
            continue
        sub = _nested(hints[name])
        if sub is not None and not (raw[name] is None and type(None) in _members(hints[name])):
            values[name] = build(sub, raw[name], where, at)
        else:
            values[name] = check_value(raw[name], hints[name], f.metadata, f"{where}: {at}")
    return cls(**values)


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("required"):
        return "REQUIRED"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return "null" if value is None else value if isinstance(value, str) else json.dumps(value)


def listing(name: str, cls: type, indent: int = 0) -> list[str]:
    """Annotated YAML lines for schema ``cls`` under key ``name``: every field, its default and meaning
    (nested schemas as indented blocks)."""
    hints = typing.get_type_hints(cls)
    pad = " " * indent
    lines = [f"{pad}{name}:  # {(cls.__doc__ or '').strip()}"]
    for f in dataclasses.fields(cls):
        sub = _nested(hints[f.name])
        if sub is not None:
            lines.extend(listing(f.name, sub, indent + 2))
            continue
        lines.append(f"{pad}  {f.name}: {_default_text(f)}  # {describe(hints[f.name], f.metadata)}; "
                     f"{f.metadata['doc']}")
    return lines


__all__ = ["SchemaError", "build", "check_value", "describe", "listing", "option"]
