"""Swap TASP core attention into Megatron-Core layer / block / hybrid specs.

``tasp_layer_spec(spec)`` returns a copy of any Megatron spec (a TransformerLayer ``ModuleSpec``, a
``TransformerBlockSubmodules`` with ``layer_specs``, an MLA layer spec, a hybrid/Mamba stack spec, an MTP
block spec) in which every self-attention ``core_attention`` slot holds ``TaspDotProductAttention``.
Composite core attentions (DSA's sparse attention with an indexer) and cross-attention are left alone.

Options: ``tasp_layer_spec(spec, options=TaspOptions(...))`` (or field keywords such as ``num_rings=2``)
places one TaspOptions in every slot's ``ModuleSpec.params["options"]``; that is the only way options
reach ``TaspDotProductAttention``.

Ready-made spec functions for Megatron-LM (``--spec megatron_tasp.megatron.spec <function>``; 0.19's
``GPTModelBuilder`` calls ``fn(model_config, vp_stage=vp_stage)``): :func:`gpt_tasp_spec` (Megatron-LM's
default choice for the config, then swapped), :func:`gpt_tasp_local_spec`, :func:`gpt_tasp_te_spec`,
:func:`gpt_tasp_decoder_block_spec`. They take ``options=``; without it, the options validated from
Megatron-LM's ``--tasp-*`` flags (``get_args().tasp_options``) when present, else the defaults. For
HybridModel use ``megatron_tasp.megatron.hybrid_spec``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any

from megatron_tasp.megatron.args import megatron_lm_options
from megatron_tasp.megatron.core_attention import TaspDotProductAttention
from megatron_tasp.options import TaspOptions, parse_options


class SpecError(ValueError):
    """The spec has no self-attention core_attention slot to replace."""


def _module_of(value: Any) -> Any:
    return getattr(value, "module", value) if _is_module_spec(value) else value


def _is_module_spec(value: Any) -> bool:
    from megatron.core.transformer.spec_utils import ModuleSpec

    return isinstance(value, ModuleSpec)


def _is_replaceable_core_attention(value: Any) -> bool:
    """Dense core attentions (local, TE, kitchen, TASP) are replaced; composite ones (DSA) are kept."""
    if value is None:
        return False
    if _is_module_spec(value) and value.submodules is not None:
        return False  # e.g. DSAttention with its indexer submodules
    mod = _module_of(value)
    name = mod[-1] if isinstance(mod, tuple) else getattr(mod, "__name__", "")
    return not str(name).startswith("DSA")


def _is_config(obj: Any) -> bool:
    from megatron.core.model_parallel_config import ModelParallelConfig

    return isinstance(obj, ModelParallelConfig)


def _copy_tree(obj: Any) -> Any:
    """Copy the spec structure (ModuleSpecs, dataclasses, lists, dicts); share classes, functions, configs."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not _is_config(obj):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            try:
                object.__setattr__(new, f.name, _copy_tree(getattr(obj, f.name)))
            except AttributeError:
                pass
        return new
    if isinstance(obj, functools.partial):  # 0.19 builders: partial(Cls.as_submodule, submodules=...)
        return functools.partial(obj.func, *(_copy_tree(a) for a in obj.args),
                                 **{k: _copy_tree(v) for k, v in obj.keywords.items()})
    if isinstance(obj, list):
        return [_copy_tree(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _copy_tree(v) for k, v in obj.items()}
    return obj


def _replacement_for(slot: Any, replacement: Any) -> Any:
    """What goes in a slot: ``replacement``, except that a slot already carrying TASP options keeps them
    when the replacement carries none (re-swapping a TASP spec without options changes nothing)."""
    if replacement is TaspDotProductAttention and _module_of(slot) is TaspDotProductAttention:
        return slot
    return replacement


def _swap(obj: Any, replacement: Any, field_name: str | None, seen: set[int]) -> int:
    """Replace core_attention below every ``self_attention`` spec; return how many slots were replaced."""
    if id(obj) in seen:
        return 0
    if isinstance(obj, list):
        seen.add(id(obj))
        return sum(_swap(x, replacement, field_name, seen) for x in obj)
    if isinstance(obj, functools.partial):
        seen.add(id(obj))
        sub = obj.keywords.get("submodules")
        if (field_name == "self_attention" and sub is not None and hasattr(sub, "core_attention")
                and _is_replaceable_core_attention(sub.core_attention)):
            sub.core_attention = _replacement_for(sub.core_attention, replacement)
            return 1 + _swap(sub, replacement, None, seen)
        return sum(_swap(v, replacement, k, seen) for k, v in obj.keywords.items())
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return 0
    seen.add(id(obj))
    count = 0
    if _is_module_spec(obj):
        sub = obj.submodules
        if (field_name == "self_attention" and sub is not None and hasattr(sub, "core_attention")
                and _is_replaceable_core_attention(sub.core_attention)):
            sub.core_attention = _replacement_for(sub.core_attention, replacement)
            count += 1
        return count + _swap(sub, replacement, None, seen)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        if f.name == "cross_attention":
            continue
        count += _swap(value, replacement, f.name, seen)
    return count


def _spec_options(options: TaspOptions | None, fields: dict[str, Any], where: str) -> TaspOptions | None:
    """One TaspOptions from ``options`` and/or field keywords (None when neither is given: the module then
    takes ``default_options()`` when it is built)."""
    given = {k: v for k, v in fields.items() if v is not None}
    if options is not None and not isinstance(options, TaspOptions):
        raise TypeError(f"{where}: options must be a TaspOptions, got {type(options).__name__}; build one with "
                        "megatron_tasp.options.parse_options({...}) or pass the fields as keywords")
    if not given:
        return options
    if options is None:
        return parse_options(given, where=where)
    parsed = parse_options(given, use_env=False, where=where)  # checks the names and values
    names = [k[5:] if k.startswith("tasp_") else k for k in given]
    return options.replace(**{name: getattr(parsed, name) for name in names})


def tasp_core_attention_spec(options: TaspOptions | None = None, **fields: Any) -> Any:
    """The value to put in a ``core_attention`` slot: the class (no options: ``default_options()`` at build
    time), or a ModuleSpec whose ``params`` carry ``options`` (a TaspOptions). ``fields`` (num_rings,
    topology, transport, kernel, chunks, keep_kv, ...: the names of TaspOptions) are parsed by
    ``megatron_tasp.options.parse_options`` (defaults < environment < given) or, with ``options``, applied
    on top of it."""
    opts = _spec_options(options, fields, "tasp_core_attention_spec")
    if opts is None:
        return TaspDotProductAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=TaspDotProductAttention, params={"options": opts})


def tasp_layer_spec(spec: Any, *, strict: bool = True, options: TaspOptions | None = None, **fields: Any) -> Any:
    """Return a copy of a Megatron layer/block/stack spec with TASP core attention in every attention layer.

    ``options`` (a TaspOptions) and/or ``fields`` (TaspOptions field names, e.g. ``num_rings=2,
    transport="p2p"``; see :func:`tasp_core_attention_spec`) are baked into the spec as
    ``ModuleSpec.params["options"]``; with neither, each module takes ``default_options()`` when built.
    Raises SpecError when ``strict`` and no self-attention ``core_attention`` slot exists.
    """
    new = _copy_tree(spec)
    replacement = tasp_core_attention_spec(options, **fields)
    # A bare SelfAttention/MLA spec (not wrapped in a layer) counts as a self_attention slot too.
    root_field = "self_attention" if _is_module_spec(new) and hasattr(new.submodules, "core_attention") else None
    n = _swap(new, replacement, root_field, set())
    if n == 0 and strict:
        raise SpecError(
            f"no self-attention core_attention slot found in {type(spec).__name__} spec; pass a TransformerLayer "
            "ModuleSpec, a TransformerBlockSubmodules (layer_specs), an MLA layer spec or a hybrid stack spec")
    return new


def tasp_options_of(spec: Any) -> list[TaspOptions | None]:
    """The options of every TASP core_attention slot in ``spec`` (None: the class, default options)."""
    return [_options_of(ca) for ca in _tasp_slots(spec)]


def _options_of(value: Any) -> TaspOptions | None:
    return (getattr(value, "params", None) or {}).get("options") if _is_module_spec(value) else None


def _tasp_slots(spec: Any) -> list[Any]:
    """Every core_attention slot value in ``spec`` that builds TaspDotProductAttention, in visiting order."""
    found: list[Any] = []

    def visit(obj: Any, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        if isinstance(obj, list):
            seen.add(id(obj))
            for x in obj:
                visit(x, seen)
            return
        if isinstance(obj, functools.partial):
            seen.add(id(obj))
            for v in obj.keywords.values():
                visit(v, seen)
            return
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            return
        seen.add(id(obj))
        ca = getattr(obj, "core_attention", None)
        if ca is not None and _module_of(ca) is TaspDotProductAttention:
            found.append(ca)
        for f in dataclasses.fields(obj):
            visit(getattr(obj, f.name, None), seen)

    visit(spec, set())
    return found


def count_tasp_layers(spec: Any) -> int:
    """Number of core_attention slots in ``spec`` that hold TaspDotProductAttention."""
    return len(_tasp_slots(spec))


# ------------------------------------------------------------------------------------------------------------
# Ready spec functions (Megatron-LM --spec / GPTModelConfig.transformer_layer_spec).
# ------------------------------------------------------------------------------------------------------------

def _transformer_config(config: Any) -> Any:
    """The TransformerConfig inside a Megatron-LM GPTModelConfig, or the config itself."""
    return getattr(config, "transformer", config) if config is not None else None


def _layer_kwargs(fn: Any, config: Any) -> dict[str, Any]:
    """Keyword arguments of a Megatron layer-spec function taken from the config (version-tolerant)."""
    cfg = _transformer_config(config)
    if cfg is None:
        return {}
    wanted = {
        "num_experts": getattr(cfg, "num_moe_experts", None),
        "moe_grouped_gemm": getattr(cfg, "moe_grouped_gemm", False),
        "qk_layernorm": getattr(cfg, "qk_layernorm", False),
        "multi_latent_attention": getattr(cfg, "multi_latent_attention", False),
        "normalization": getattr(cfg, "normalization", None),
        "qk_l2_norm": getattr(cfg, "qk_l2_norm", False),
    }
    params = inspect.signature(fn).parameters
    return {k: v for k, v in wanted.items() if k in params}


def _te_available() -> bool:
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except Exception:  # noqa: BLE001
        return False
    return bool(getattr(te_ext, "HAVE_TE", False))


def _options_or_args(options: TaspOptions | None) -> TaspOptions | None:
    """``options``, else Megatron-LM's validated ``--tasp-*`` flags (``get_args().tasp_options``) when a
    Megatron-LM run has them, else None (each module takes ``default_options()``)."""
    if options is not None:
        return options
    return megatron_lm_options()


def gpt_tasp_local_spec(config: Any = None, vp_stage: int | None = None, *,
                        options: TaspOptions | None = None) -> Any:
    """Megatron-Core's local (no Transformer Engine) GPT layer spec with TASP core attention.

    ``options``: see :func:`_options_or_args` (the same for every ``gpt_tasp_*`` function)."""
    from megatron.core.models.gpt import gpt_layer_specs as g

    fn = getattr(g, "get_gpt_layer_local_submodules", None) or g.get_gpt_layer_local_spec
    spec = g.get_gpt_layer_local_spec(**_layer_kwargs(fn, config))
    return tasp_layer_spec(spec, options=_options_or_args(options))


def gpt_tasp_te_spec(config: Any = None, vp_stage: int | None = None, *, options: TaspOptions | None = None) -> Any:
    """Megatron-Core's Transformer Engine GPT layer spec with TASP core attention (needs TE)."""
    if not _te_available():
        raise ImportError("gpt_tasp_te_spec needs Transformer Engine (pip install transformer-engine); "
                          "use gpt_tasp_local_spec without it")
    from megatron.core.models.gpt import gpt_layer_specs as g

    fn = getattr(g, "get_gpt_layer_with_transformer_engine_submodules", None) or \
        g.get_gpt_layer_with_transformer_engine_spec
    spec = g.get_gpt_layer_with_transformer_engine_spec(**_layer_kwargs(fn, config))
    return tasp_layer_spec(spec, options=_options_or_args(options))


def gpt_tasp_decoder_block_spec(config: Any, vp_stage: int | None = None,
                                use_transformer_engine: bool | None = None, pp_rank: int | None = None, *,
                                options: TaspOptions | None = None) -> Any:
    """Megatron-Core's GPT decoder block spec (MoE, per-layer specs) with TASP core attention in every layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    cfg = _transformer_config(config)
    if use_transformer_engine is None:
        use_transformer_engine = getattr(cfg, "transformer_impl", "local") == "transformer_engine" and _te_available()
    kwargs: dict[str, Any] = {"normalization": getattr(cfg, "normalization", None),
                              "qk_l2_norm": getattr(cfg, "qk_l2_norm", False)}
    params = inspect.signature(get_gpt_decoder_block_spec).parameters
    if "vp_stage" in params:
        kwargs["vp_stage"] = vp_stage
    if pp_rank is not None and "pp_rank" in params:
        kwargs["pp_rank"] = pp_rank
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine, **kwargs)
    return tasp_layer_spec(spec, strict=bool(spec.layer_specs), options=_options_or_args(options))


def gpt_tasp_spec(config: Any, vp_stage: int | None = None, *, options: TaspOptions | None = None) -> Any:
    """The spec Megatron-LM would pick for this config (``default_layer_spec``), with TASP core attention.

    With a plain TransformerConfig (no Megatron-LM): the decoder block spec for MoE, else the TE layer spec
    when ``transformer_impl == "transformer_engine"`` and TE is installed, else the local layer spec.
    """
    if hasattr(config, "transformer"):
        from megatron.training.models.gpt import default_layer_spec

        spec = default_layer_spec(config, vp_stage)
        return tasp_layer_spec(spec, strict=not (hasattr(spec, "layer_specs") and not spec.layer_specs),
                               options=_options_or_args(options))
    if getattr(config, "num_moe_experts", None):
        return gpt_tasp_decoder_block_spec(config, vp_stage, options=options)
    if getattr(config, "transformer_impl", "local") == "transformer_engine" and _te_available():
        return gpt_tasp_te_spec(config, vp_stage, options=options)
    return gpt_tasp_local_spec(config, vp_stage, options=options)


__all__ = [
    "SpecError", "count_tasp_layers", "gpt_tasp_decoder_block_spec", "gpt_tasp_local_spec", "gpt_tasp_spec",
    "gpt_tasp_te_spec", "tasp_core_attention_spec", "tasp_layer_spec", "tasp_options_of",
]
