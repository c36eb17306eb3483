"""Build Megatron-Core's GPTModel with TASP core attention from a recipe (call after parallel_state init).

TASP's options reach the attention layers through the layer spec (``tasp_layer_spec(spec, options=...)``),
never as attributes of the TransformerConfig.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from megatron_tasp.apps.finetune_lib.recipe import Recipe, RecipeError
from megatron_tasp.apps.finetune_lib.rope import MegatronRope, megatron_rope


def transformer_config(recipe: Recipe, device: torch.device) -> Any:
    """The Megatron ``TransformerConfig`` of a recipe (dropout 0: TASP has no attention dropout)."""
    import dataclasses

    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    m, p, t = recipe.model, recipe.parallel, recipe.train
    bf16 = t.precision == "bf16"
    swiglu = m.activation == "swiglu"
    kwargs: dict[str, Any] = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=recipe.query_groups, ffn_hidden_size=m.ffn_hidden_size, kv_channels=recipe.kv_channels,
        normalization=m.normalization, layernorm_epsilon=m.norm_epsilon, gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu, add_bias_linear=m.add_bias_linear, add_qkv_bias=m.add_qkv_bias,
        attention_dropout=0.0, hidden_dropout=0.0, init_method_std=m.init_std,
        tensor_model_parallel_size=p.tp, context_parallel_size=p.cp,
        cp_comm_type="tasp" if p.cp > 1 else None,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=device.type == "cpu",
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,  # the loss is the mean over every token of the global batch
    )
    if t.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif t.recompute == "selective":
        kwargs["recompute_granularity"] = "selective"
        names = {f.name for f in dataclasses.fields(TransformerConfig)}
        if "recompute_modules" in names:
            kwargs["recompute_modules"] = ["core_attn"]
    config = TransformerConfig(**kwargs)
    for name, value in megatron_rope(m).config_attributes.items():  # YaRN: read by GPTModel and Attention
        setattr(config, name, value)
    return config


def layer_spec(recipe: Recipe, config: Any) -> Any:
    """Megatron's local or Transformer Engine GPT layer spec with TASP core attention and the recipe's options."""
    from megatron_tasp.megatron.spec import gpt_tasp_local_spec, gpt_tasp_te_spec, tasp_layer_spec

    base = gpt_tasp_te_spec(config) if recipe.model.spec == "te" else gpt_tasp_local_spec(config)
    return tasp_layer_spec(base, options=recipe.tasp_options())


def build_model(recipe: Recipe, config: Any, vocab_size: int, device: torch.device
                ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(wrapped, core)``: GPTModel (``core``) of ``config`` (:func:`transformer_config`) on ``device``;
    ``wrapped`` adds Float16Module for bf16."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    m, d = recipe.model, recipe.data
    rotary_base: float | int = int(m.rotary_base) if float(m.rotary_base).is_integer() else m.rotary_base
    rope = megatron_rope(m)
    check_rope_support(recipe, rope)
    core = GPTModel(
        config=config, transformer_layer_spec=layer_spec(recipe, config), vocab_size=vocab_size,
        max_sequence_length=m.max_position_embeddings or d.seq_length,
        position_embedding_type=rope.position_embedding_type, rotary_percent=m.rotary_percent,
        rotary_base=rotary_base, seq_len_interpolation_factor=rope.seq_len_interpolation_factor,
        share_embeddings_and_output_weights=m.tie_embeddings, parallel_output=True,
    )
    if rope.llama3:
        scale_llama3(core, rope.llama3)
    core = core.to(device)
    if d.packing:  # packed documents: RoPE without megatron-core's host reads (same result)
        from megatron_tasp.megatron.thd_rope import install_thd_rope

        install_thd_rope()
    wrapped: torch.nn.Module = Float16Module(config, core) if recipe.train.precision == "bf16" else core
    return wrapped, core


def count_parameters(core: torch.nn.Module) -> int:
    """Trainable parameters (shared weights counted once)."""
    return sum(p.numel() for p in core.parameters() if p.requires_grad)


def estimate_parameters(recipe: Recipe, vocab_size: int) -> int:
    """Parameter count from the recipe alone (no torch model), for ``--check``."""
    m = recipe.model
    h, kv, heads, groups = m.hidden_size, recipe.kv_channels, m.num_attention_heads, recipe.query_groups
    bias = 1 if m.add_bias_linear else 0
    qkv = h * (heads + 2 * groups) * kv + max(bias, int(m.add_qkv_bias)) * (heads + 2 * groups) * kv
    proj = heads * kv * h + bias * h
    fc1 = h * m.ffn_hidden_size * (2 if m.activation == "swiglu" else 1)
    fc1 += bias * m.ffn_hidden_size * (2 if m.activation == "swiglu" else 1)
    fc2 = m.ffn_hidden_size * h + bias * h
    norms = 2 * h * (1 if m.normalization == "RMSNorm" else 2)
    per_layer = qkv + proj + fc1 + fc2 + norms
    emb = vocab_size * h * (1 if m.tie_embeddings else 2)
    pos = (m.max_position_embeddings or recipe.data.seq_length) * h if m.position_embedding == "learned_absolute" \
        else 0
    final = h * (1 if m.normalization == "RMSNorm" else 2)
    return m.num_layers * per_layer + emb + pos + final


# ----- RoPE context extension (model.rope_scaling; the plan comes from .rope) -----------------------------------

def check_rope_support(recipe: Recipe, rope: MegatronRope) -> None:
    """Raise RecipeError when the installed megatron-core lacks the piece ``rope`` relies on."""
    from megatron.core import package_info
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer import attention

    kind = recipe.model.rope_scaling.rope_type
    if rope.llama3:
        scaling = getattr(RotaryEmbedding, "_apply_scaling", None)
        ok = scaling is not None and set(rope.llama3) <= set(inspect.signature(scaling).parameters)
    elif rope.position_embedding_type == "yarn":
        # Attention applies YaRN's attention factor to q and k only where it reads it from the config.
        ok = hasattr(attention, "_yarn_get_concentration_factor_from_config")
    else:
        return
    if not ok:
        raise RecipeError(f"{recipe.source}: model.rope_scaling: rope_type {kind} is not served by megatron-core "
                          f"{package_info.__version__} (0.16.1 and 0.19.2 serve it); upgrade megatron-core or set "
                          "rope_type: none")


def scale_llama3(core: torch.nn.Module, params: dict[str, float]) -> None:
    """Llama 3.1 frequencies through megatron-core's own ``RotaryEmbedding._apply_scaling`` with the recipe's
    four values (``GPTModel(rope_scaling=True)`` would fix low 1, high 4 and original 8192)."""
    emb = core.rotary_pos_emb
    emb.inv_freq = emb._apply_scaling(emb.inv_freq, **params)


__all__ = ["build_model", "check_rope_support", "count_parameters", "estimate_parameters", "layer_spec",
           "scale_llama3", "transformer_config"]
