"""megatron-tasp: TASP (topology-aware multi-ring) context parallelism for Megatron-Core.

Importing this package needs neither torch nor Megatron: the topology and schedule layers are pure
Python, and the torch/Megatron parts load on first use of their names.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from megatron_tasp.topology import Topology, hamiltonian_rings, load_topology, multinode_rings

__version__ = "0.1.0"

_LAZY = {
    "tasp_attention": "megatron_tasp.attention",
    "tasp_run_summary": "megatron_tasp.attention",
    "TaspConfigError": "megatron_tasp.attention",
    "clear_plan_cache": "megatron_tasp.attention",
    "TaspOptions": "megatron_tasp.options",
    "parse_options": "megatron_tasp.options",
    "TaspDotProductAttention": "megatron_tasp.megatron.core_attention",
    "Schedule": "megatron_tasp.schedule",
    "compile_schedule": "megatron_tasp.schedule",
}

__all__ = ["Topology", "hamiltonian_rings", "load_topology", "multinode_rings", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_tasp' has no attribute {name!r}")
