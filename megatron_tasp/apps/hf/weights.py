"""Weight names and layouts: Hugging Face Llama-family state dicts <-> Megatron-Core GPTModel state dicts.

Pure tensor work (torch only; no Megatron, no transformers). Both directions are generators that pull one source
tensor at a time through a ``get(name)`` callable, so a model never needs two full copies in memory.

Megatron's layouts (TP = 1):

- ``linear_qkv.weight`` fuses q, k and v per query group: for group g the rows are its ``heads/groups`` query
  heads, then its key head, then its value head (``head_dim`` rows each); biases follow the same order.
- ``linear_fc1.weight`` of SwiGLU stacks ``[gate; up]`` (gate = the SiLU branch).
- The local spec keeps RMSNorm weights as ``input_layernorm`` / ``pre_mlp_layernorm``; the Transformer Engine
  spec fuses them into the following linear as ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``
  (the names Megatron's distributed checkpoints use for both specs).
- The vocabulary is padded to a multiple: imported embedding and output rows beyond the HF vocabulary are zero,
  exported ones are trimmed. Tied embeddings have no ``output_layer.weight`` (nor HF ``lm_head.weight``).

HF's Llama stores q/k in the rotate-half RoPE layout, which is Megatron's default (``rotary_interleaved=False``),
so no per-head permutation is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

NAMINGS = ("local", "te")


@dataclass(frozen=True)
class Layout:
    """Shapes and options that decide names and layouts."""

    num_layers: int
    heads: int
    groups: int
    head_dim: int
    vocab: int          # rows in the HF checkpoint
    padded_vocab: int   # rows in the Megatron model (>= vocab)
    tied: bool = False
    qkv_bias: bool = False      # bias on q/k/v only (Qwen2)
    linear_bias: bool = False   # bias on every linear (Llama with attention_bias and mlp_bias)
    naming: str = "local"       # Megatron state-dict names: local or te spec

    def __post_init__(self) -> None:
        if self.naming not in NAMINGS:
            raise ValueError(f"naming must be one of {', '.join(NAMINGS)}, got {self.naming!r}")
        if self.heads % self.groups:
            raise ValueError(f"heads ({self.heads}) must be a multiple of groups ({self.groups})")
        if self.padded_vocab < self.vocab:
            raise ValueError(f"padded vocabulary {self.padded_vocab} is smaller than the vocabulary {self.vocab}")

    @classmethod
    def from_section(cls, section: dict[str, Any], vocab: int, padded_vocab: int, naming: str = "local"
                     ) -> Layout:
        """From a recipe model section (a dict of its fields)."""
        heads = int(section["num_attention_heads"])
        return cls(num_layers=int(section["num_layers"]), heads=heads,
                   groups=int(section.get("num_query_groups") or heads),
                   head_dim=int(section.get("kv_channels") or int(section["hidden_size"]) // heads),
                   vocab=vocab, padded_vocab=padded_vocab, tied=bool(section["tie_embeddings"]),
                   qkv_bias=bool(section.get("add_qkv_bias", False)),
                   linear_bias=bool(section.get("add_bias_linear", False)), naming=naming)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int
             ) -> torch.Tensor:
    """Megatron's per-group ``[q heads of the group, k, v]`` rows from HF's q/k/v (weights or biases)."""
    rest = q.shape[1:]
    r = heads // groups
    qg = q.reshape(groups, r, head_dim, *rest)
    kg = k.reshape(groups, 1, head_dim, *rest)
    vg = v.reshape(groups, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((heads + 2 * groups) * head_dim, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    rest = qkv.shape[1:]
    r = heads // groups
    if qkv.shape[0] != (heads + 2 * groups) * head_dim:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected (heads + 2 * groups) * head_dim = "
                         f"{(heads + 2 * groups) * head_dim}")
    g = qkv.reshape(groups, r + 2, head_dim, *rest)
    q = g[:, :r].reshape(heads * head_dim, *rest)
    return q.contiguous(), g[:, r].reshape(groups * head_dim, *rest).contiguous(), \
        g[:, r + 1].reshape(groups * head_dim, *rest).contiguous()


def pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """``w`` with zero rows appended up to ``rows``."""
    if w.shape[0] == rows:
        return w
    out = w.new_zeros((rows, *w.shape[1:]))
    out[: w.shape[0]] = w
    return out


def padding_note(vocab: int, padded: int) -> str | None:
    """What padding the vocabulary changes, or None when there is none.

    Megatron's softmax runs over every row of the output layer: zero rows give logit 0, so until training pushes
    them down they take probability mass that HF's model does not have (the logits of real tokens are equal)."""
    if padded == vocab:
        return None
    return (f"the vocabulary of {vocab} is padded to {padded}: the {padded - vocab} zero output rows take part in "
            f"Megatron's softmax, so losses differ from the HF model's until training lowers them; for an exact "
            f"start use model.vocab_size: {vocab} (convert --vocab-multiple 1)")


def _norm_names(layout: Layout, i: int) -> tuple[str, str]:
    p = f"decoder.layers.{i}."
    if layout.naming == "te":
        return p + "self_attention.linear_qkv.layer_norm_weight", p + "mlp.linear_fc1.layer_norm_weight"
    return p + "input_layernorm.weight", p + "pre_mlp_layernorm.weight"


def megatron_names(layout: Layout) -> list[str]:
    """Every tensor name of the Megatron state dict (without ``_extra_state`` entries)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(layout.num_layers):
        p = f"decoder.layers.{i}."
        names += list(_norm_names(layout, i))
        names += [p + "self_attention.linear_qkv.weight", p + "self_attention.linear_proj.weight",
                  p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
        if layout.qkv_bias or layout.linear_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if layout.linear_bias:
            names += [p + "self_attention.linear_proj.bias", p + "mlp.linear_fc1.bias", p + "mlp.linear_fc2.bias"]
    names.append("decoder.final_layernorm.weight")
    if not layout.tied:
        names.append("output_layer.weight")
    return names


def hf_names(layout: Layout) -> list[str]:
    """Every tensor name of the HF state dict."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(layout.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if layout.qkv_bias or layout.linear_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if layout.linear_bias:
            names += [p + "self_attn.o_proj.bias"] + [p + f"mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
    if not layout.tied:
        names.append("lm_head.weight")
    return names


Getter = Callable[[str], torch.Tensor]


def hf_to_megatron(get: Getter, layout: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron ``(name, tensor)`` pairs built from HF tensors read through ``get``."""
    L = layout
    yield "embedding.word_embeddings.weight", pad_rows(get("model.embed_tokens.weight"), L.padded_vocab)
    for i in range(L.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        norm_in, norm_mlp = _norm_names(L, i)
        yield norm_in, get(h + "input_layernorm.weight")
        attn = h + "self_attn."
        yield m + "self_attention.linear_qkv.weight", fuse_qkv(
            get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"),
            L.heads, L.groups, L.head_dim)
        if L.qkv_bias or L.linear_bias:
            yield m + "self_attention.linear_qkv.bias", fuse_qkv(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"),
                L.heads, L.groups, L.head_dim)
        yield m + "self_attention.linear_proj.weight", get(attn + "o_proj.weight")
        yield norm_mlp, get(h + "post_attention_layernorm.weight")
        mlp = h + "mlp."
        yield m + "mlp.linear_fc1.weight", torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")])
        yield m + "mlp.linear_fc2.weight", get(mlp + "down_proj.weight")
        if L.linear_bias:
            yield m + "self_attention.linear_proj.bias", get(attn + "o_proj.bias")
            yield m + "mlp.linear_fc1.bias", torch.cat([get(mlp + "gate_proj.bias"), get(mlp + "up_proj.bias")])
            yield m + "mlp.linear_fc2.bias", get(mlp + "down_proj.bias")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not L.tied:
        yield "output_layer.weight", pad_rows(get("lm_head.weight"), L.padded_vocab)


def megatron_to_hf(get: Getter, layout: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs built from Megatron tensors read through ``get`` (vocabulary trimmed)."""
    L = layout
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")[: L.vocab]
    for i in range(L.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        norm_in, norm_mlp = _norm_names(L, i)
        attn = h + "self_attn."
        yield h + "input_layernorm.weight", get(norm_in)
        q, k, v = split_qkv(get(m + "self_attention.linear_qkv.weight"), L.heads, L.groups, L.head_dim)
        yield from ((attn + "q_proj.weight", q), (attn + "k_proj.weight", k), (attn + "v_proj.weight", v))
        if L.qkv_bias or L.linear_bias:
            q, k, v = split_qkv(get(m + "self_attention.linear_qkv.bias"), L.heads, L.groups, L.head_dim)
            yield from ((attn + "q_proj.bias", q), (attn + "k_proj.bias", k), (attn + "v_proj.bias", v))
        yield attn + "o_proj.weight", get(m + "self_attention.linear_proj.weight")
        yield h + "post_attention_layernorm.weight", get(norm_mlp)
        gate, up = get(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
        yield h + "mlp.gate_proj.weight", gate.contiguous()
        yield h + "mlp.up_proj.weight", up.contiguous()
        yield h + "mlp.down_proj.weight", get(m + "mlp.linear_fc2.weight")
        if L.linear_bias:
            yield attn + "o_proj.bias", get(m + "self_attention.linear_proj.bias")
            gate, up = get(m + "mlp.linear_fc1.bias").chunk(2, dim=0)
            yield h + "mlp.gate_proj.bias", gate.contiguous()
            yield h + "mlp.up_proj.bias", up.contiguous()
            yield h + "mlp.down_proj.bias", get(m + "mlp.linear_fc2.bias")
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not L.tied:
        yield "lm_head.weight", get("output_layer.weight")[: L.vocab]


def detect_naming(names: Any) -> str:
    """``te`` when the norms are fused into the linears (Transformer Engine spec), else ``local``."""
    return "te" if any(str(n).endswith("linear_qkv.layer_norm_weight") for n in names) else "local"


__all__ = ["Getter", "Layout", "NAMINGS", "detect_naming", "fuse_qkv", "hf_names", "hf_to_megatron",
           "megatron_names", "megatron_to_hf", "pad_rows", "padding_note", "split_qkv"]
