"""The "te" backend: Transformer Engine fused attention (cuDNN), imported lazily. EXPERIMENTAL.

Transformer Engine cannot be installed on this project's machines, so this path is written against TE 2.x's
``transformer_engine.pytorch.cpp_extensions.fused_attn`` and has not been run here; it is never chosen by
"auto", only by name. ``is_available`` is False unless TE imports and exposes ``fused_attn_fwd``,
``fused_attn_bwd`` and ``FusedAttnBackend`` with the 2.x signature (a ``fake_dtype`` parameter).

Calls (bound by parameter NAME at run time): ``fused_attn_fwd(is_training, max_seqlen_q, max_seqlen_kv,
cu_seqlens_q, cu_seqlens_kv, q, k, v, fake_dtype, fused_attention_backend, ..., attn_scale, dropout,
qkv_layout, attn_bias_type, attn_mask_type, window_size, ...)`` -> ``(out, aux_ctx_tensors)`` with
``aux_ctx_tensors = [softmax stats (b, h, sq, 1) float32 = lse, rng_state]`` for the F16_arbitrary_seqlen
(cuDNN) backend; ``fused_attn_bwd(max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, o, d_o,
fake_dtype, dqkv_dtype, aux_ctx_tensors, fused_attention_backend, ...)`` -> ``[dq, dk, dv, ...]``. The merged
lse replaces the stats in ``aux_ctx_tensors`` for the backward (as TE's own context parallelism does).
Tensors go in as ``sbhd`` when q/k/v are transposes of contiguous ``[s, b, h, d]`` memory (no copy), else as
contiguous ``bshd``. GQA is native.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .._calls import call_python
from ..base import BlockAttention, register_kernel

__all__ = ["TransformerEngineAttention"]


@dataclass
class _TeApi:
    fused_attn: ModuleType
    te_dtype: dict[torch.dtype, Any]


@functools.cache
def _load() -> _TeApi | str:
    """TE's fused-attention API, or a string saying why it cannot be used."""
    try:
        fa = importlib.import_module("transformer_engine.pytorch.cpp_extensions.fused_attn")
        consts = importlib.import_module("transformer_engine.pytorch.constants")
    except Exception as exc:  # ImportError, or a broken CUDA build
        return f"transformer_engine is not importable ({type(exc).__name__}: {exc})"
    for attr in ("fused_attn_fwd", "fused_attn_bwd", "FusedAttnBackend"):
        if not hasattr(fa, attr):
            return f"transformer_engine fused_attn has no {attr}"
    try:
        params = inspect.signature(fa.fused_attn_fwd).parameters
    except (TypeError, ValueError):
        return "cannot read the signature of transformer_engine fused_attn_fwd"
    if "fake_dtype" not in params or "qkv_layout" not in params:
        return "unsupported transformer_engine version (needs the 2.x fused_attn_fwd with fake_dtype)"
    te_dtype = getattr(consts, "TE_DType", None)
    if not isinstance(te_dtype, dict) or "F16_arbitrary_seqlen" not in fa.FusedAttnBackend:
        return "unsupported transformer_engine version (no TE_DType map or F16_arbitrary_seqlen backend)"
    return _TeApi(fa, te_dtype)


def _layout(q: Tensor, k: Tensor, v: Tensor) -> tuple[str, tuple[Tensor, Tensor, Tensor]]:
    """Choose sbhd (zero-copy for Megatron's [s,b,h,d] views) or contiguous bshd."""
    sb = tuple(x.permute(2, 0, 1, 3) for x in (q, k, v))
    if all(x.is_contiguous() for x in sb):
        return "sbhd", sb  # type: ignore[return-value]
    return "bshd", tuple(x.transpose(1, 2).contiguous() for x in (q, k, v))  # type: ignore[return-value]


def _to_bhsd(x: Tensor, fmt: str) -> Tensor:
    return x.permute(1, 2, 0, 3) if fmt == "sbhd" else x.transpose(1, 2)


def _from_bhsd(x: Tensor, fmt: str) -> Tensor:
    return (x.permute(2, 0, 1, 3) if fmt == "sbhd" else x.transpose(1, 2)).contiguous()


def _cu_seqlens(b: int, s: int, device: torch.device) -> Tensor:
    return torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)


def _mask_values(causal: bool) -> dict[str, Any]:
    return {"attn_mask_type": "causal" if causal else "no_mask", "window_size": (-1, 0) if causal else (-1, -1)}


@register_kernel
class TransformerEngineAttention(BlockAttention):
    """Transformer Engine's cuDNN fused attention (experimental, untested here)."""

    name = "te"

    @classmethod
    def unavailable_reason(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return f"needs a CUDA device, got {device.type}"
        if not torch.cuda.is_available():
            return "CUDA is not available in this process"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {dtype} is not supported (bf16/fp16 only)"
        if head_dim <= 0 or head_dim % 8 != 0 or head_dim > 128:
            return f"head_dim must be a positive multiple of 8 and <= 128, got {head_dim}"
        api = _load()
        return api if isinstance(api, str) else None

    def _api(self) -> _TeApi:
        api = _load()
        if isinstance(api, str):
            raise RuntimeError(api)
        return api

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        api = self._api()
        fmt, (qt, kt, vt) = _layout(q, k, v)
        b, h, sq, _ = q.shape
        sk = k.shape[2]
        backend = api.fused_attn.FusedAttnBackend["F16_arbitrary_seqlen"]
        cu_q, cu_k = _cu_seqlens(b, sq, q.device), _cu_seqlens(b, sk, q.device)
        values = dict(
            _mask_values(causal),
            is_training=True, max_seqlen_q=sq, max_seqlen_kv=sk, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k,
            q=qt, k=kt, v=vt, fake_dtype=q.dtype, fused_attention_backend=backend, attn_scale=scale, dropout=0.0,
            qkv_layout=f"{fmt}_{fmt}_{fmt}", attn_bias_type="no_bias",
        )  # fmt: skip
        res = call_python(api.fused_attn.fused_attn_fwd, values, what="transformer_engine fused_attn_fwd")
        out_t, aux = res[0], list(res[1])
        stats = aux[0]
        if stats.numel() != b * h * sq:
            raise RuntimeError(f"unexpected TE softmax stats shape {tuple(stats.shape)} for q {tuple(q.shape)}")
        lse = stats.reshape(b, h, sq).to(torch.float32).contiguous()
        ctx = {"aux": aux, "fmt": fmt, "stats_shape": tuple(stats.shape), "backend": backend, "cu": (cu_q, cu_k)}
        return _to_bhsd(out_t, fmt), lse, ctx

    def _backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: Any,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        api = self._api()
        fmt = ctx["fmt"]
        _, (qt, kt, vt) = _layout(q, k, v)
        b, h, sq, _ = q.shape
        aux = list(ctx["aux"])
        aux[0] = lse.to(torch.float32).reshape(ctx["stats_shape"]).contiguous()  # merged lse replaces the stats
        cu_q, cu_k = ctx["cu"]
        values = dict(
            _mask_values(causal),
            max_seqlen_q=sq, max_seqlen_kv=k.shape[2], cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k, q=qt, k=kt, v=vt,
            o=_from_bhsd(out.to(q.dtype), fmt), d_o=_from_bhsd(dout.to(q.dtype), fmt), fake_dtype=q.dtype,
            dqkv_dtype=api.te_dtype[q.dtype], aux_ctx_tensors=aux, fused_attention_backend=ctx["backend"],
            attn_scale=scale, dropout=0.0, qkv_layout=f"{fmt}_{fmt}_{fmt}", attn_bias_type="no_bias",
            deterministic=False,
        )  # fmt: skip
        res = call_python(api.fused_attn.fused_attn_bwd, values, what="transformer_engine fused_attn_bwd")
        dq, dk, dv = res[0], res[1], res[2]
        return _to_bhsd(dq, fmt), _to_bhsd(dk, fmt), _to_bhsd(dv, fmt)
