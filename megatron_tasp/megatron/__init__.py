"""Megatron-Core / Megatron-LM integration of TASP context parallelism (the only place importing Megatron).

- ``TaspDotProductAttention``: Megatron's core-attention contract, TASP over ``pg_collection.cp``.
- ``tasp_layer_spec(spec, options=TaspOptions(...))``: copy of a layer/block/stack spec with TASP core attention
  (the options travel in the spec's ``ModuleSpec.params``; none: ``default_options()`` when built).
- ``gpt_tasp_spec`` & co.: spec functions for ``--spec megatron_tasp.megatron.spec <fn>``.
- ``add_tasp_args`` / ``validate_tasp_args``: the ``--context-parallel-backend`` flag family.
- ``enable_cpu_megatron``: run megatron.core on CPU/gloo (tests, CPU fine-tuning).

Names load lazily: importing this package imports neither torch nor Megatron.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "TaspDotProductAttention": "megatron_tasp.megatron.core_attention",
    "tasp_layer_spec": "megatron_tasp.megatron.spec",
    "tasp_core_attention_spec": "megatron_tasp.megatron.spec",
    "count_tasp_layers": "megatron_tasp.megatron.spec",
    "tasp_options_of": "megatron_tasp.megatron.spec",
    "gpt_tasp_spec": "megatron_tasp.megatron.spec",
    "gpt_tasp_local_spec": "megatron_tasp.megatron.spec",
    "gpt_tasp_te_spec": "megatron_tasp.megatron.spec",
    "gpt_tasp_decoder_block_spec": "megatron_tasp.megatron.spec",
    "SpecError": "megatron_tasp.megatron.spec",
    "add_tasp_args": "megatron_tasp.megatron.args",
    "validate_tasp_args": "megatron_tasp.megatron.args",
    "tasp_options_from_args": "megatron_tasp.megatron.args",
    "enable_cpu_megatron": "megatron_tasp.megatron.cpu_compat",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_tasp.megatron' has no attribute {name!r}")
