"""RoPE context extension of a recipe (``model.rope_scaling``): the checks of its keys and the plan that maps
each kind onto Megatron-Core's own RoPE implementations (pure Python; :mod:`.model` applies the plan).

- ``linear`` (position interpolation): ``GPTModel(seq_len_interpolation_factor=factor)`` divides the
  positions by ``factor``; Hugging Face divides the inverse frequencies instead: the same angles.
- ``llama3`` (Llama 3.1): ``RotaryEmbedding._apply_scaling(inv_freq, factor, low_freq_factor,
  high_freq_factor, original_max_position_embeddings)``. ``GPTModel(rope_scaling=True)`` passes only
  ``factor`` (low 1, high 4, original 8192 stay at that method's defaults), so the model is built without it
  and the method is applied to the unscaled frequencies with all four of the recipe's values.
- ``yarn``: ``GPTModel(position_embedding_type='yarn')`` (``YarnRotaryEmbedding``), configured through the
  ``yarn_*`` attributes that GPTModel and Megatron's ``Attention`` read from the TransformerConfig.
  Attention multiplies cos and sin by YaRN's attention factor for q and k (the logits grow by its square),
  which is what Hugging Face's Llama does with ``attention_factor``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_tasp.apps.finetune_lib.sections import ModelSection

KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "truncate"),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "none": (), "linear": ("factor",), "llama3": KEYS["llama3"], "yarn": ("factor", "original_max_position_embeddings"),
}
YARN_BETA_FAST = 32.0  # YaRN's (and Hugging Face's, megatron-core's) defaults
YARN_BETA_SLOW = 1.0


def rope_scaling_problem(model: ModelSection, cp: int) -> str | None:
    """What is wrong with ``model.rope_scaling`` (one line naming the field and the fix), or None."""
    rs = model.rope_scaling
    kind = rs.rope_type
    given = [f.name for f in dataclasses.fields(rs) if f.name != "rope_type" and getattr(rs, f.name) is not None]
    foreign = [name for name in given if name not in KEYS[kind]]
    if foreign:
        keys = ", ".join(KEYS[kind]) or "none"
        return (f"model.rope_scaling.{foreign[0]} is not a key of rope_type {kind} (its keys: {keys}); remove it "
                "or choose the rope_type it belongs to")
    missing = [name for name in REQUIRED[kind] if getattr(rs, name) is None]
    if missing:
        return f"model.rope_scaling: rope_type {kind} needs {', '.join(missing)}"
    if kind == "none":
        return None
    if model.position_embedding != "rope":
        return f"model.rope_scaling needs model.position_embedding: rope (got {model.position_embedding})"
    if kind == "llama3" and rs.high_freq_factor <= rs.low_freq_factor:  # type: ignore[operator]
        return (f"model.rope_scaling.high_freq_factor={rs.high_freq_factor:g} must be larger than low_freq_factor="
                f"{rs.low_freq_factor:g} (Llama 3.1: 4 and 1)")
    if kind == "yarn":
        if (rs.mscale is None) != (rs.mscale_all_dim is None):
            return ("model.rope_scaling: set both mscale and mscale_all_dim or neither (with one of them Hugging "
                    "Face ignores it and uses 0.1 ln(factor) + 1)")
        fast = YARN_BETA_FAST if rs.beta_fast is None else rs.beta_fast
        slow = YARN_BETA_SLOW if rs.beta_slow is None else rs.beta_slow
        if fast <= slow:
            return f"model.rope_scaling.beta_fast={fast:g} must be larger than beta_slow={slow:g} (YaRN: 32 and 1)"
        if model.rotary_percent != 1.0:
            return (f"model.rope_scaling: rope_type yarn rotates the whole head dim (megatron-core's "
                    f"YarnRotaryEmbedding); set model.rotary_percent: 1 (got {model.rotary_percent:g})")
        original = rs.original_max_position_embeddings
        if cp > 1 and original % (2 * cp):  # type: ignore[operator]
            return (f"model.rope_scaling.original_max_position_embeddings={original} must be a multiple of 2 * "
                    f"parallel.cp = {2 * cp} (megatron-core's YarnRotaryEmbedding builds a table of that many "
                    "positions and splits it over the CP ranks)")
    return None


@dataclass(frozen=True)
class MegatronRope:
    """How a recipe's RoPE reaches Megatron-Core: GPTModel's ``position_embedding_type`` and
    ``seq_len_interpolation_factor``, the keyword arguments of ``RotaryEmbedding._apply_scaling`` (llama3) and
    the TransformerConfig attributes of GPTModel's yarn path (set before the model is built)."""

    position_embedding_type: str
    seq_len_interpolation_factor: float | None = None
    llama3: dict[str, float] = field(default_factory=dict)
    config_attributes: dict[str, Any] = field(default_factory=dict)


def megatron_rope(model: ModelSection) -> MegatronRope:
    """The Megatron-Core plan of a validated ``model`` section (:func:`rope_scaling_problem` is None)."""
    rs = model.rope_scaling
    if model.position_embedding != "rope" or rs.rope_type == "none":
        return MegatronRope(model.position_embedding)
    if rs.rope_type == "linear":
        return MegatronRope("rope", seq_len_interpolation_factor=rs.factor)
    if rs.rope_type == "llama3":
        return MegatronRope("rope", llama3={
            "factor": rs.factor, "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings})
    return MegatronRope("yarn", config_attributes={
        "yarn_rotary_scaling_factor": rs.factor,
        "yarn_original_max_position_embeddings": rs.original_max_position_embeddings,
        "yarn_beta_fast": YARN_BETA_FAST if rs.beta_fast is None else rs.beta_fast,
        "yarn_beta_slow": YARN_BETA_SLOW if rs.beta_slow is None else rs.beta_slow,
        # None, None: megatron-core's attention factor is then 0.1 ln(factor) + 1, as Hugging Face's
        "yarn_mscale": rs.mscale,
        "yarn_mscale_all_dim": rs.mscale_all_dim,
        "yarn_correction_range_round_to_int": True if rs.truncate is None else rs.truncate,
    })


__all__ = ["KEYS", "REQUIRED", "MegatronRope", "megatron_rope", "rope_scaling_problem"]
