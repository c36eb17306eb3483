"""Packaging: pyproject.toml alone, every package folder listed, shipped configs readable as resources."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def test_every_package_folder_is_listed():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(conf["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "megatron_tasp").rglob("__init__.py")}
    assert found - listed == set(), f"add these packages to pyproject.toml: {sorted(found - listed)}"
    assert listed - found == {"megatron_tasp.configs"}, sorted(listed - found)
    assert not (REPO / "setup.py").exists()


def test_shipped_configs_are_resources():
    from megatron_tasp.topology import list_presets, load_topology

    assert {"h100-sxm-8", "mi300x-8", "gb200-nvl72"} <= set(list_presets())
    assert load_topology("h100-sxm-8").world_size == 8
