"""Hugging Face ``config.json`` <-> the fine-tuning recipe's ``model`` section (pure Python, no torch).

Supported: decoder-only Llama-family checkpoints whose blocks are RMSNorm -> attention (RoPE, GQA/MHA) ->
RMSNorm -> SwiGLU MLP: ``LlamaForCausalLM`` (Llama 2, 3, 3.1, 3.2), ``MistralForCausalLM`` (without sliding
windows) and ``Qwen2ForCausalLM`` (bias on q/k/v only); RoPE scaling goes into the recipe's ``model.rope_scaling``.
Anything else in ``config.json`` that would change the computation (another activation, partial rotary, sliding
windows, biases on only some linears, RoPE scaling the recipe cannot express) raises :class:`HFConfigError` naming
the key; nothing is dropped silently.

Both ``config.json`` spellings of RoPE are read: transformers 4's ``rope_theta`` + ``rope_scaling`` and
transformers 5's ``rope_parameters`` (``rope_theta`` and ``rope_type`` in one mapping).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HF_PREFIX = "hf:"  # checkpoint.pretrained: hf:DIR
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Fields of the recipe's model section that must equal the HF checkpoint's (checked by ``hf:`` starts and exports).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "kv_channels", "position_embedding", "rotary_percent", "normalization", "norm_epsilon", "activation",
                "add_bias_linear", "add_qkv_bias", "tie_embeddings")
# RoPE may differ: a long-context fine-tune changes it on purpose (reported, and written into exported configs).
ROPE_FIELDS = ("rotary_base", "rope_scaling")


class HFConfigError(ValueError):
    """A Hugging Face checkpoint cannot be represented (or read); the message names the key and the fix."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as read from ``config.json`` (``rope_type`` other than default, e.g. llama3)."""

    rope_type: str
    factor: float
    params: tuple[tuple[str, float | int], ...] = ()  # the remaining numeric keys, sorted by name

    def to_dict(self) -> dict[str, Any]:
        """``{"rope_type": ..., "factor": ..., <params>}`` (the keys of the recipe's ``model.rope_scaling``)."""
        return {"rope_type": self.rope_type, "factor": self.factor, **dict(self.params)}


@dataclass(frozen=True)
class HFModel:
    """What an HF ``config.json`` says about the model, in recipe terms."""

    architecture: str
    vocab_size: int                      # the real vocabulary (rows of embed_tokens)
    section: dict[str, Any]              # recipe model-section fields (vocab_size padded to a multiple)
    dtype: str                           # fp32, bf16 or fp16 (config.json's torch_dtype / dtype)
    max_position_embeddings: int | None
    rope_scaling: RopeScaling | None
    config: dict[str, Any]               # config.json as read


def hf_dir(pretrained: str | None) -> Path | None:
    """The directory of a ``checkpoint.pretrained: hf:DIR`` value (``$VARS`` and ``~`` expanded first), else None."""
    value = os.path.expandvars(pretrained or "")
    if not value.startswith(HF_PREFIX):
        return None
    return Path(os.path.expanduser(value[len(HF_PREFIX):]))


def read_config(hf_dir: str | Path) -> dict[str, Any]:
    """``HF_DIR/config.json`` as a dict."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise HFConfigError(f"{path}: no such directory (expected a Hugging Face model directory with config.json)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise HFConfigError(f"{path}: no config.json (expected a Hugging Face model directory written by "
                            "save_pretrained)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise HFConfigError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise HFConfigError(f"{cfg_path}: expected a JSON object")
    return cfg


def _architecture(cfg: dict[str, Any], where: str) -> str:
    archs = cfg.get("architectures") or []
    names = ", ".join(SUPPORTED)
    if len(archs) != 1 or archs[0] not in SUPPORTED:
        got = ", ".join(map(str, archs)) or f"model_type {cfg.get('model_type')!r}"
        raise HFConfigError(f"{where}: unsupported architecture {got}; supported: {names}")
    return str(archs[0])


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """``(theta, scaling)`` from either spelling of RoPE in config.json."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers 5
        theta = params["rope_theta"]
        scaling = params
    else:
        theta = cfg.get("rope_theta", 10000.0)
    if not scaling:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise HFConfigError(f"{where}: rope_scaling must be a mapping, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if "factor" not in scaling:
        raise HFConfigError(f"{where}: rope_scaling of type {kind!r} has no factor")
    rest = tuple(sorted((str(k), v) for k, v in scaling.items()
                        if k not in ("rope_type", "type", "factor", "rope_theta") and v is not None))
    return float(theta), RopeScaling(str(kind), float(scaling["factor"]), rest)


def _refuse(where: str, key: str, value: Any, why: str) -> None:
    raise HFConfigError(f"{where}: {key}={value!r} is not supported ({why})")


def _biases(cfg: dict[str, Any], arch: str, where: str) -> tuple[bool, bool]:
    """``(add_bias_linear, add_qkv_bias)``: Megatron biases every linear, or only the fused QKV."""
    if arch == "Qwen2ForCausalLM":
        return False, True
    attn, mlp = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    if attn != mlp:
        _refuse(where, "attention_bias/mlp_bias", (attn, mlp), "Megatron's add_bias_linear puts a bias on every "
                "linear layer; only both true or both false map onto it")
    return attn and mlp, False


def hf_model(cfg: dict[str, Any], vocab_multiple: int = 1, where: str = "config.json") -> HFModel:
    """Read an HF config into recipe terms; unsupported settings raise :class:`HFConfigError`."""
    arch = _architecture(cfg, where)
    try:
        layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        heads, ffn, vocab = int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    except KeyError as exc:
        raise HFConfigError(f"{where}: missing key {exc.args[0]}") from None
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if cfg.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", cfg.get("hidden_act"), "only silu (SwiGLU) is supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse(where, "partial_rotary_factor", cfg["partial_rotary_factor"], "RoPE must rotate the whole head")
    window = cfg.get("sliding_window")
    if window is not None and (arch != "Qwen2ForCausalLM" or cfg.get("use_sliding_window")):
        _refuse(where, "sliding_window", window, "TASP computes full causal attention; a model trained with a "
                "window would see different attention beyond it")
    if int(cfg.get("pretraining_tp", 1)) != 1:
        _refuse(where, "pretraining_tp", cfg["pretraining_tp"], "only 1 is supported")
    bias_linear, qkv_bias = _biases(cfg, arch, where)
    theta, scaling = _rope(cfg, where)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    section: dict[str, Any] = {
        "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "num_query_groups": groups,
        "ffn_hidden_size": ffn, "kv_channels": head_dim, "vocab_size": -(-vocab // vocab_multiple) * vocab_multiple,
        "position_embedding": "rope", "rotary_base": theta, "rotary_percent": 1.0, "normalization": "RMSNorm",
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)), "activation": "swiglu",
        "add_bias_linear": bias_linear, "add_qkv_bias": qkv_bias,
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }
    if scaling is not None:
        section["rope_scaling"] = _rope_scaling_value(scaling, where)
    return HFModel(arch, vocab, section, DTYPES.get(str(dtype), "fp32"), cfg.get("max_position_embeddings"),
                   scaling, cfg)


def _rope_scaling_value(scaling: RopeScaling, where: str) -> dict[str, Any]:
    """The recipe's ``model.rope_scaling`` mapping for ``scaling``; a kind or key the recipe lacks fails closed."""
    from megatron_tasp.apps.finetune_lib.sections import RopeScaling as RecipeRope

    fields = {f.name: f for f in dataclasses.fields(RecipeRope)}
    kinds = [k for k in fields["rope_type"].metadata.get("choices") or () if k != "none"]
    if scaling.rope_type not in kinds:
        raise HFConfigError(f"{where}: rope scaling of type {scaling.rope_type!r} is not supported (model.rope_scaling "
                            f"serves {', '.join(kinds)})")
    value = scaling.to_dict()
    foreign = sorted(set(value) - set(fields))
    if foreign:
        raise HFConfigError(f"{where}: rope scaling key(s) {', '.join(foreign)} of type {scaling.rope_type!r} have no "
                            "model.rope_scaling field; RoPE without them would compute something else")
    return value


def active_rope(value: Any) -> dict[str, Any] | None:
    """A ``model.rope_scaling`` value (dataclass or mapping) as its set keys, or None for rope_type none."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict) or value.get("rope_type", "none") == "none":
        return None
    return {k: v for k, v in value.items() if v is not None}


def section_yaml(model: HFModel) -> str:
    """The recipe ``model:`` section for this checkpoint, as YAML to paste into a recipe."""
    import yaml

    body = yaml.safe_dump({"model": model.section}, sort_keys=False, default_flow_style=False)
    head = (f"# recipe model section of this {model.architecture} (vocabulary {model.vocab_size}, padded to "
            f"{model.section['vocab_size']})\n")
    return head + body


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return bool(a == b)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return _same(a, b)


def check_recipe(recipe: Any, model: HFModel, vocab: int) -> list[str]:
    """Raise :class:`HFConfigError` naming the first recipe field that differs from the HF checkpoint in shape or
    computation; return the RoPE differences (``rotary_base``, ``rope_scaling``) as notes: changing RoPE is how a
    fine-tune extends the context, so those may differ.

    ``recipe`` is a validated ``Recipe``; ``vocab`` the model vocabulary the run uses (rows after padding)."""
    m = recipe.model
    resolved = {"num_query_groups": recipe.query_groups, "kv_channels": recipe.kv_channels,
                "rope_scaling": active_rope(m.rope_scaling)}
    notes = []
    for name in (*SHAPE_FIELDS, *ROPE_FIELDS):
        want = model.section.get(name)
        got = resolved[name] if name in resolved else getattr(m, name)
        if _same_value(got, want):
            continue
        if name in ROPE_FIELDS:
            notes.append(f"model.{name}: {want!r} in config.json, {got!r} in the recipe")
            continue
        raise HFConfigError(f"{recipe.source}: model.{name}={got!r} but the Hugging Face checkpoint has {want!r}; "
                            f"set model.{name}: {want!r} (megatron-tasp convert hf-to-mcore DIR --print-section "
                            "prints the whole section)")
    if vocab < model.vocab_size:
        raise HFConfigError(f"{recipe.source}: the model vocabulary ({vocab}) is smaller than config.json's vocab_size "
                            f"({model.vocab_size}); set model.vocab_size: {model.section['vocab_size']}")
    return notes


def _set_rope(out: dict[str, Any], theta: float, rope: dict[str, Any] | None) -> None:
    """Write RoPE into a config dict in the spelling it already uses (transformers 5's rope_parameters or not)."""
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = {"rope_type": "default", **(rope or {}), "rope_theta": theta}
        out.pop("rope_scaling", None)
    else:
        out["rope_theta"] = theta
        out["rope_scaling"] = rope


def export_config(recipe_model: dict[str, Any], vocab_size: int, max_positions: int,
                  base: dict[str, Any] | None = None, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` for a model of ``recipe_model`` (a recipe model section as a dict).

    With ``base`` (the config the weights came from) its keys are kept, the shape is checked against it, and RoPE,
    dtype and ``max_position_embeddings`` (at least ``max_positions``) follow the recipe; otherwise a
    ``LlamaForCausalLM`` config (``Qwen2ForCausalLM`` for QKV-only biases) is written."""
    m = recipe_model
    why = {"position_embedding": "rope", "normalization": "RMSNorm", "activation": "swiglu"}
    for key, need in why.items():
        if m.get(key) != need:
            raise HFConfigError(f"model.{key}={m.get(key)!r}: Hugging Face Llama-family export needs {need}")
    if m.get("rotary_percent", 1.0) != 1.0:
        raise HFConfigError(f"model.rotary_percent={m['rotary_percent']}: Llama-family export needs 1.0")
    rope, theta = active_rope(m.get("rope_scaling")), float(m["rotary_base"])
    heads = m["num_attention_heads"]
    head_dim = m.get("kv_channels") or m["hidden_size"] // heads
    qwen = bool(m.get("add_qkv_bias")) and not m.get("add_bias_linear")
    if base is not None:
        out = dict(base)
        got = hf_model(base, where="the base config.json")
        resolved = {**m, "num_query_groups": m.get("num_query_groups") or heads, "kv_channels": head_dim}
        for name in SHAPE_FIELDS:
            want = resolved.get(name, False)  # add_qkv_bias may be absent from older recipes: False
            if not _same_value(got.section.get(name), want):
                raise HFConfigError(f"the base config.json has {name}={got.section[name]!r} but the checkpoint's "
                                    f"model.{name} is {want!r}; pass the config.json these weights belong to")
        if vocab_size < got.vocab_size:
            raise HFConfigError(f"the base config.json has vocab_size={got.vocab_size} but the checkpoint holds only "
                                f"{vocab_size} rows")
        _set_rope(out, theta, rope)
        out["max_position_embeddings"] = max(int(out.get("max_position_embeddings") or 0), max_positions)
        out["dtype" if "dtype" in out else "torch_dtype"] = dtype
        return out
    arch = "Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"
    bias = bool(m.get("add_bias_linear"))
    out = {
        "architectures": [arch], "model_type": SUPPORTED[arch], "vocab_size": vocab_size,
        "hidden_size": m["hidden_size"], "intermediate_size": m["ffn_hidden_size"],
        "num_hidden_layers": m["num_layers"], "num_attention_heads": heads,
        "num_key_value_heads": m.get("num_query_groups") or heads, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": m["norm_epsilon"], "max_position_embeddings": max_positions,
        "tie_word_embeddings": bool(m["tie_embeddings"]), "torch_dtype": dtype,
        "initializer_range": m.get("init_std", 0.02),
    }
    _set_rope(out, theta, rope)
    if not qwen:
        out.update(attention_bias=bias, mlp_bias=bias)
    return out


__all__ = ["DTYPES", "HF_PREFIX", "HFConfigError", "HFModel", "ROPE_FIELDS", "RopeScaling", "SHAPE_FIELDS",
           "SUPPORTED", "active_rope", "check_recipe", "export_config", "hf_dir", "hf_model", "read_config",
           "section_yaml"]
