"""The shared dataclass-schema validator: types, bounds, nested sections, error locations, purity."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import megatron_tasp.schema as schema_module
from megatron_tasp.schema import SchemaError, build, listing, option


@dataclass(frozen=True)
class Inner:
    """A nested section."""

    rate: float = option(1.0, "a rate", gt=0)
    count: int | None = option(None, "a count; null = auto", min=1)


@dataclass(frozen=True)
class Outer:
    """A document."""

    name: str = option(None, "an id", required=True)
    flag: bool = option(False, "a switch")
    inner: Inner = option(Inner(), "the inner section")
    extra: Inner | None = option(None, "an optional section")


def _err(raw, path=""):
    with pytest.raises(SchemaError) as exc:
        build(Outer, raw, "f.yaml", path)
    return str(exc.value)


def test_build_nested_and_defaults():
    doc = build(Outer, {"name": "a", "inner": {"rate": 2, "count": 3}, "extra": {}}, "f.yaml")
    assert doc == Outer("a", False, Inner(2.0, 3), Inner())
    assert type(doc.inner.rate) is float  # an integer is widened to a number
    assert build(Outer, {"name": "a", "inner": None, "extra": None}, "f.yaml") == Outer("a")


@pytest.mark.parametrize("raw,needle", [
    ({}, "f.yaml: name: missing required field (an id)"),
    ({"name": "a", "flag": 1}, "f.yaml: flag must be true or false, got 1"),
    ({"name": "a", "inner": {"rate": True}}, "f.yaml: inner.rate must be a number (> 0), got True"),
    ({"name": "a", "inner": {"rate": 0}}, "f.yaml: inner.rate must be a number (> 0), got 0"),
    ({"name": "a", "inner": {"count": 0}}, "f.yaml: inner.count must be an integer (>= 1) or null, got 0"),
    ({"name": "a", "inner": {"count": 2.5}}, "f.yaml: inner.count must be an integer (>= 1) or null, got 2.5"),
    ({"name": "a", "inner": {"speed": 1}}, "f.yaml: inner: unknown field(s) speed; allowed: rate, count"),
    ({"name": "a", "extra": [1]}, "f.yaml: extra must be a mapping of fields, got list"),
    ({"name": "a", "colour": 1}, "f.yaml: unknown field(s) colour; allowed: name, flag, inner, extra"),
    ([1], "f.yaml: the document must be a mapping of fields, got list"),
])
def test_errors_name_file_field_and_what_is_accepted(raw, needle):
    assert _err(raw) == needle


def test_section_path_prefixes_every_location():
    assert _err({"name": "a", "inner": {"rate": -1}}, "top") == "f.yaml: top.inner.rate must be a number (> 0), got -1"
    assert _err([1], "top") == "f.yaml: top must be a mapping of fields, got list"


def test_listing_indents_nested_sections():
    lines = listing("outer", Outer)
    assert lines[0] == "outer:  # A document."
    assert "  name: REQUIRED  # a string; an id" in lines
    assert "  inner:  # A nested section." in lines
    assert "    rate: 1.0  # a number (> 0); a rate" in lines


def test_schema_module_imports_nothing_from_the_package():
    tree = ast.parse(Path(schema_module.__file__).read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith(("megatron_tasp", "torch"))]
