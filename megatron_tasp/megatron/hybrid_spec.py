"""HybridModel (Mamba/attention) stack spec with TASP core attention, for Megatron-LM's ``--spec``.

``--spec megatron_tasp.megatron.hybrid_spec tasp_hybrid_stack_spec`` (HybridModelBuilder uses the attribute
as a ModuleSpec, so it is built when this module is imported). The stock stack spec uses Transformer
Engine (and mamba-ssm) modules for everything but core attention.
"""

from __future__ import annotations

from typing import Any

from megatron_tasp.megatron.args import megatron_lm_options
from megatron_tasp.megatron.spec import tasp_layer_spec
from megatron_tasp.options import TaspOptions


def default_hybrid_stack_spec() -> Any:
    """Megatron-Core's stock hybrid stack spec (0.19: models.hybrid; older: models.mamba)."""
    try:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    except ImportError:
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec as hybrid_stack_spec
    return hybrid_stack_spec


def hybrid_tasp_stack_spec(spec: Any = None, *, options: TaspOptions | None = None) -> Any:
    """A copy of ``spec`` (default: the stock hybrid stack spec) with TASP core attention; ``options``
    default to Megatron-LM's validated ``--tasp-*`` flags when a run has them, else to default_options()."""
    options = megatron_lm_options() if options is None else options
    return tasp_layer_spec(default_hybrid_stack_spec() if spec is None else spec, options=options)


tasp_hybrid_stack_spec = hybrid_tasp_stack_spec()

__all__ = ["default_hybrid_stack_spec", "hybrid_tasp_stack_spec", "tasp_hybrid_stack_spec"]
