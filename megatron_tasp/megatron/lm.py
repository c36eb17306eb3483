"""Glue for Megatron-LM's training stack (megatron.training, 0.19 layout): spec selection from parsed args.

Used by the launcher (``python -m megatron_tasp.megatron.pretrain_gpt``, no Megatron-LM patch) and by the
patched ``GPTModelBuilder.build_model`` (``patches/``). The ``--tasp-*`` flags reach the attention as one
``TaspOptions`` (``args.tasp_options``, built by ``validate_tasp_args``) placed in the spec by
``tasp_layer_spec(spec, options=...)``. Imports megatron.training lazily.
"""

from __future__ import annotations

import inspect
from typing import Any

from megatron_tasp.megatron.args import megatron_lm_options, tasp_options_from_args
from megatron_tasp.options import TaspOptions


def uses_tasp(cp_comm_type: Any) -> bool:
    """Whether a cp_comm_type value (str or per-layer list) selects TASP for any layer."""
    if cp_comm_type is None:
        return False
    values = [cp_comm_type] if isinstance(cp_comm_type, str) else list(cp_comm_type)
    return any(str(v).strip().lower() == "tasp" for v in values)


def _current_args() -> Any:
    try:
        from megatron.training.global_vars import get_args

        return get_args()
    except Exception:  # noqa: BLE001 - not initialised, or megatron.training unavailable
        return None


def spec_options(args: Any = None) -> TaspOptions | None:
    """The TaspOptions for ``tasp_layer_spec`` from parsed args (default: Megatron-LM's global args); None
    without args (each module then takes ``default_options()``)."""
    args = _current_args() if args is None else args
    if args is None:
        return None
    return tasp_options_from_args(args)


def _has_layers(spec: Any) -> bool:
    return not (hasattr(spec, "layer_specs") and len(spec.layer_specs) == 0)


def tasp_builder_specs(layer_spec: Any, mtp_spec: Any = None, args: Any = None) -> tuple[Any, Any]:
    """Swap TASP core attention into a builder's decoder spec and MTP spec (options from args)."""
    from megatron_tasp.megatron.spec import tasp_layer_spec

    options = spec_options(args)
    layer_spec = tasp_layer_spec(layer_spec, strict=_has_layers(layer_spec), options=options)
    if mtp_spec is not None:
        mtp_spec = tasp_layer_spec(mtp_spec, strict=False, options=options)
    return layer_spec, mtp_spec


def resolve_layer_spec(spec: Any, model_config: Any, vp_stage: int | None) -> Any:
    """What GPTModelBuilder does with ``transformer_layer_spec``: default, call a function, or use as is."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is None:
        from megatron.training.models.gpt import default_layer_spec

        return default_layer_spec(model_config, vp_stage)
    if not isinstance(spec, ModuleSpec) and callable(spec):
        if "vp_stage" in inspect.signature(spec).parameters:
            return spec(model_config, vp_stage=vp_stage)
        return spec(model_config)
    return spec


def install_tasp_model_config(model_cfg: Any, args: Any) -> None:
    """Make a Megatron-LM GPTModelConfig build TASP core attention (decoder and MTP layers).

    Wraps the config's layer spec (user ``--spec`` or Megatron's default) in a function that swaps TASP in
    with the options of ``args``, and wraps ``megatron.training.models.gpt.mtp_block_spec`` likewise for
    MTP layers. Nothing is set on the TransformerConfig.
    """
    import megatron.training.models.gpt as gpt_builder_mod

    options = spec_options(args)
    user_spec = model_cfg.transformer_layer_spec

    def tasp_spec(config: Any, vp_stage: int | None = None) -> Any:
        from megatron_tasp.megatron.spec import tasp_layer_spec

        spec = resolve_layer_spec(user_spec, config, vp_stage)
        return tasp_layer_spec(spec, strict=_has_layers(spec), options=options)

    model_cfg.transformer_layer_spec = tasp_spec

    original = gpt_builder_mod.mtp_block_spec
    if getattr(original, "_megatron_tasp", False):
        original = original._megatron_tasp_original  # type: ignore[attr-defined]

    def mtp_block_spec_with_tasp(config: Any, transformer_layer_spec: Any, vp_stage: int | None = None) -> Any:
        from megatron_tasp.megatron.spec import tasp_layer_spec

        spec = original(config, transformer_layer_spec, vp_stage=vp_stage)
        if spec is None or not uses_tasp(getattr(config, "cp_comm_type", None)):
            return spec
        return tasp_layer_spec(spec, strict=False, options=options)

    mtp_block_spec_with_tasp._megatron_tasp = True  # type: ignore[attr-defined]
    mtp_block_spec_with_tasp._megatron_tasp_original = original  # type: ignore[attr-defined]
    gpt_builder_mod.mtp_block_spec = mtp_block_spec_with_tasp


__all__ = ["install_tasp_model_config", "megatron_lm_options", "resolve_layer_spec", "spec_options",
           "tasp_builder_specs", "uses_tasp"]
