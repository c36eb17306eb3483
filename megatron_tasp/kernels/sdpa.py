"""CUDA backends on PyTorch's private SDPA ops: "cudnn", "flash" (FA2 inside torch) and "efficient".

Ops used (argument lists are bound by NAME from the op's schema at run time, see ``_calls.call_aten``, so the
positional order of a given torch release does not matter):

* ``aten._scaled_dot_product_cudnn_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p,
  is_causal, return_debug_mask, *, scale)`` -> (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
  philox_seed, philox_offset, debug_attn_mask); lse is (b, h, s, 1) on torch 2.5-2.13.
  ``aten._scaled_dot_product_cudnn_attention_backward(grad_out, query, key, value, out, logsumexp,
  philox_seed, philox_offset, attn_bias, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale)``.
* ``aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, return_debug_mask, *,
  scale)`` -> (output, logsumexp (b,h,s), cum_seq_q, cum_seq_k, max_q, max_k, philox_seed|rng_state,
  philox_offset|unused, debug_attn_mask); backward ``(grad_out, query, key, value, out, logsumexp, cum_seq_q,
  cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *, scale)``.
* ``aten._scaled_dot_product_efficient_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p,
  is_causal, *, scale)`` -> (output, log_sumexp (b,h,ceil32(s)), philox_seed, philox_offset); backward
  ``(grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset, dropout_p,
  grad_input_mask, is_causal, *, scale)`` -> (dq, dk, dv, dbias).

The backward is fed the MERGED out/lse. To give each backward op exactly the memory layout its own forward
produced, the merged out, dout and lse are copied into the strides (and padding / trailing unit dim) that
this block's forward returned, recorded in the ctx (no copy when they already match).
GQA: cuDNN and flash take fewer KV heads directly (seen on H100, torch 2.11); efficient needs expanded K/V
(expanded here, gradients summed back over each group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._calls import BoundOp, has_aten_op
from .base import BlockAttention, expand_kv, last_dim_contiguous, register_kernel, sum_kv_groups

__all__ = ["CudnnAttention", "EfficientAttention", "FlashSdpaAttention", "SdpaCtx"]


_AUX_KEYS = ("cum_seq_q", "cum_seq_k", "max_q", "max_k", "philox_seed", "philox_offset")


@dataclass
class SdpaCtx:
    """Per-block state for the backward: RNG tensors and sequence metadata of the forward, and the layouts
    (shape, stride) of its output and raw logsumexp."""

    aux: dict[str, Any] = field(default_factory=dict)
    out_layout: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    lse_layout: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())


def _layout(t: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(t.shape), tuple(t.stride())


def _into_layout(t: Tensor, layout: tuple[tuple[int, ...], tuple[int, ...]], dtype: torch.dtype) -> Tensor:
    """``t`` with the given shape/strides and dtype (copied only when needed)."""
    shape, stride = layout
    if tuple(t.shape) == shape and t.dtype == dtype and all(
            n == 1 or a == b for n, a, b in zip(shape, t.stride(), stride)):
        return t  # the same memory layout (the stride of a size-1 dimension addresses nothing)
    buf = torch.empty_strided(shape, stride, dtype=dtype, device=t.device)
    buf.copy_(t)
    return buf


def _normalise_lse(raw: Tensor, b: int, h: int, sq: int, opname: str) -> Tensor:
    """Raw op lse ((b,h,s), (b,h,s,1) or padded (b,h,>=s)) -> contiguous float32 (b,h,sq)."""
    x = raw
    if x.dim() == 4 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if x.dim() == 3 and x.shape[0] == b and x.shape[1] == h and x.shape[2] >= sq:
        return x[..., :sq].to(torch.float32).contiguous()
    raise RuntimeError(
        f"{opname} returned a logsumexp of unexpected shape {tuple(raw.shape)}; expected ({b}, {h}, {sq}), "
        f"({b}, {h}, {sq}, 1) or ({b}, {h}, >= {sq}) on torch {torch.__version__}"
    )


def _format_lse(lse: Tensor, layout: tuple[tuple[int, ...], tuple[int, ...]]) -> Tensor:
    """Merged float32 lse (b,h,sq) -> a tensor with the raw forward lse's shape/strides (padding zeroed)."""
    shape, stride = layout
    sq = lse.shape[-1]
    if len(shape) == 3 and shape == tuple(lse.shape):
        return _into_layout(lse, layout, torch.float32)
    if len(shape) == 4 and shape[-1] == 1 and lse.dtype == torch.float32:  # (b,h,s,1): a view when strides agree
        view = lse.unsqueeze(-1)
        if tuple(view.shape) == shape and all(a == b or n == 1 for a, b, n in zip(view.stride(), stride, shape)):
            return view
    buf = torch.empty_strided(shape, stride, dtype=torch.float32, device=lse.device)
    view = buf.squeeze(-1) if len(shape) == 4 else buf
    if view.shape[-1] != sq:
        buf.zero_()  # padded rows: finite values, results for them are discarded
    view[..., :sq].copy_(lse)
    return buf


def _cuda_reason(
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    *,
    ops: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...],
    max_head_dim: int,
    min_cc: tuple[int, int],
) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available in this process"
    missing = [o for o in ops if not has_aten_op(o)]
    if missing:
        return f"this torch build ({torch.__version__}) lacks aten ops {missing}"
    if dtype not in dtypes:
        return f"dtype {dtype} is not supported (supported: {', '.join(map(str, dtypes))})"
    if head_dim <= 0 or head_dim % 8 != 0 or head_dim > max_head_dim:
        return f"head_dim must be a positive multiple of 8 and <= {max_head_dim}, got {head_dim}"
    cc = torch.cuda.get_device_capability(device if device.index is not None else None)
    if tuple(cc) < min_cc:
        return f"needs compute capability >= {min_cc[0]}.{min_cc[1]}, device has {cc[0]}.{cc[1]}"
    return None


class _SdpaBackend(BlockAttention):
    """Shared forward/backward plumbing of the three SDPA ops."""

    fwd_op: ClassVar[str]
    bwd_op: ClassVar[str]
    native_gqa: ClassVar[bool]
    fwd_fallback: ClassVar[tuple[str, ...]]

    def _fwd_values(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> dict[str, Any]:
        raise NotImplementedError

    def _bwd_values(self, ctx: SdpaCtx, causal: bool, scale: float) -> dict[str, Any]:
        raise NotImplementedError

    _fwd_ignorable: ClassVar[tuple[str, ...]] = ()
    _bwd_ignorable: ClassVar[tuple[str, ...]] = ()

    def _qkv(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs with unit last-dim stride, K/V expanded when the op has no native GQA."""
        q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
        groups = q.shape[1] // k.shape[1]
        if self.native_gqa or groups == 1:
            return q, k, v
        return q, expand_kv(k, groups), expand_kv(v, groups)

    def _bound(self, which: str, values: dict[str, Any]) -> BoundOp:
        """The forward or backward op bound to these value keys (once per backend instance)."""
        bound = self.__dict__.get(f"_bound_{which}")
        if bound is None:
            name = self.fwd_op if which == "fwd" else self.bwd_op
            op = getattr(torch.ops.aten, name).default
            bound = BoundOp(op, values, ignorable=self._fwd_ignorable if which == "fwd" else self._bwd_ignorable,
                            fast=getattr(torch, name, None) if which == "fwd" else None,
                            fallback_returns=self.fwd_fallback if which == "fwd" else ())
            if which == "fwd" and not {"output", "logsumexp"} <= set(bound.index):
                raise RuntimeError(f"{name} on torch {torch.__version__} returns {sorted(bound.index)}; "
                                   "expected output and logsumexp")
            self.__dict__[f"_bound_{which}"] = bound
        return bound

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        qc, ke, ve = self._qkv(q, k, v)
        values = self._fwd_values(qc, ke, ve, causal, scale)
        bound = self._bound("fwd", values)
        res = bound(values)
        idx = bound.index
        out, raw_lse = res[idx["output"]], res[idx["logsumexp"]]
        b, h, sq, _ = q.shape
        if raw_lse.dtype == torch.float32 and raw_lse.shape == (b, h, sq, 1) and raw_lse.is_contiguous():
            lse = raw_lse.view(b, h, sq)  # cuDNN's layout: no copy
        else:
            lse = _normalise_lse(raw_lse, b, h, sq, self.fwd_op)
        aux = {key: res[idx[key]] for key in _AUX_KEYS if key in idx and idx[key] < len(res)}
        ctx = SdpaCtx(aux=aux, out_layout=_layout(out), lse_layout=_layout(raw_lse))
        return out, lse, ctx

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
        if not isinstance(ctx, SdpaCtx):
            raise ValueError(f"{self.name}: ctx must be the SdpaCtx from this backend's forward, got {type(ctx)}")
        qc, ke, ve = self._qkv(q, k, v)
        values = self._bwd_values(ctx, causal, scale)
        values.update(
            grad_out=_into_layout(dout, ctx.out_layout, q.dtype),
            query=qc,
            key=ke,
            value=ve,
            out=_into_layout(out, ctx.out_layout, q.dtype),
            logsumexp=_format_lse(lse if lse.dtype == torch.float32 else lse.to(torch.float32), ctx.lse_layout),
        )
        res = self._bound("bwd", values)(values)
        dq, dk, dv = res[0], res[1], res[2]
        h_kv = k.shape[1]
        return dq, sum_kv_groups(dk, h_kv, k.dtype), sum_kv_groups(dv, h_kv, v.dtype)


@register_kernel
class CudnnAttention(_SdpaBackend):
    """cuDNN fused attention through ``aten._scaled_dot_product_cudnn_attention`` (fastest on Hopper)."""

    name = "cudnn"
    fwd_op = "_scaled_dot_product_cudnn_attention"
    bwd_op = "_scaled_dot_product_cudnn_attention_backward"
    native_gqa = True
    fwd_fallback = (
        "output", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "philox_seed", "philox_offset",
        "debug_attn_mask",
    )  # fmt: skip
    # torch builds before compute_log_sumexp/attn_bias existed always return the lse and take no bias.
    _fwd_ignorable = ("attn_bias", "compute_log_sumexp")
    _bwd_ignorable = ("attn_bias",)

    @classmethod
    def unavailable_reason(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        reason = _cuda_reason(
            device, dtype, head_dim, ops=(cls.fwd_op, cls.bwd_op), dtypes=(torch.bfloat16, torch.float16),
            max_head_dim=128, min_cc=(8, 0),
        )  # fmt: skip
        if reason is not None:
            return reason
        if torch.version.hip is not None:
            return "cuDNN attention does not exist in ROCm/HIP builds of torch"
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available in this torch build"
        ver = torch.backends.cudnn.version() or 0
        if ver < 90000:
            return f"needs cuDNN >= 9.0 for fused attention with GQA and backward, found {ver}"
        return None

    def _fwd_values(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> dict[str, Any]:
        return {
            "query": q, "key": k, "value": v, "attn_bias": None, "compute_log_sumexp": True, "dropout_p": 0.0,
            "is_causal": causal, "return_debug_mask": False, "scale": scale,
        }  # fmt: skip

    def _bwd_values(self, ctx: SdpaCtx, causal: bool, scale: float) -> dict[str, Any]:
        a = ctx.aux
        return {
            "philox_seed": a.get("philox_seed"), "philox_offset": a.get("philox_offset"), "attn_bias": None,
            "cum_seq_q": a.get("cum_seq_q"), "cum_seq_k": a.get("cum_seq_k"), "max_q": a.get("max_q"),
            "max_k": a.get("max_k"), "dropout_p": 0.0, "is_causal": causal, "scale": scale,
        }  # fmt: skip


@register_kernel
class FlashSdpaAttention(_SdpaBackend):
    """FlashAttention-2 built into PyTorch, through ``aten._scaled_dot_product_flash_attention``."""

    name = "flash"
    fwd_op = "_scaled_dot_product_flash_attention"
    bwd_op = "_scaled_dot_product_flash_attention_backward"
    native_gqa = True
    fwd_fallback = (
        "output", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "philox_seed", "philox_offset",
        "debug_attn_mask",
    )  # fmt: skip

    @classmethod
    def unavailable_reason(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        reason = _cuda_reason(
            device, dtype, head_dim, ops=(cls.fwd_op, cls.bwd_op), dtypes=(torch.bfloat16, torch.float16),
            max_head_dim=256, min_cc=(8, 0),
        )  # fmt: skip
        if reason is not None:
            return reason
        probe = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        if probe is not None and not probe():
            return "this torch build was compiled without flash attention"
        return None

    def _fwd_values(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> dict[str, Any]:
        return {
            "query": q, "key": k, "value": v, "dropout_p": 0.0, "is_causal": causal, "return_debug_mask": False,
            "scale": scale,
        }  # fmt: skip

    def _bwd_values(self, ctx: SdpaCtx, causal: bool, scale: float) -> dict[str, Any]:
        a = ctx.aux
        return {
            "cum_seq_q": a.get("cum_seq_q"), "cum_seq_k": a.get("cum_seq_k"), "max_q": a.get("max_q"),
            "max_k": a.get("max_k"), "dropout_p": 0.0, "is_causal": causal,
            "philox_seed": a.get("philox_seed"), "philox_offset": a.get("philox_offset"), "scale": scale,
        }  # fmt: skip


@register_kernel
class EfficientAttention(_SdpaBackend):
    """Memory-efficient attention (xFormers kernels in torch); needs expanded K/V for GQA."""

    name = "efficient"
    fwd_op = "_scaled_dot_product_efficient_attention"
    bwd_op = "_scaled_dot_product_efficient_attention_backward"
    native_gqa = False
    fwd_fallback = ("output", "logsumexp", "philox_seed", "philox_offset")

    @classmethod
    def unavailable_reason(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        reason = _cuda_reason(
            device, dtype, head_dim, ops=(cls.fwd_op, cls.bwd_op),
            dtypes=(torch.bfloat16, torch.float16, torch.float32), max_head_dim=256, min_cc=(5, 0),
        )  # fmt: skip
        if reason is not None:
            return reason
        probe = getattr(torch.backends.cuda, "is_efficient_attention_available", None)
        if probe is not None and not probe():
            return "this torch build was compiled without memory-efficient attention"
        return None

    def _fwd_values(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> dict[str, Any]:
        return {
            "query": q, "key": k, "value": v, "attn_bias": None, "compute_log_sumexp": True, "dropout_p": 0.0,
            "is_causal": causal, "scale": scale,
        }  # fmt: skip

    def _bwd_values(self, ctx: SdpaCtx, causal: bool, scale: float) -> dict[str, Any]:
        a = ctx.aux
        return {
            "attn_bias": None, "philox_seed": a.get("philox_seed"), "philox_offset": a.get("philox_offset"),
            "dropout_p": 0.0, "grad_input_mask": [True, True, True, False], "is_causal": causal, "scale": scale,
        }  # fmt: skip
