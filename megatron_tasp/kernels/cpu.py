"""The "cpu" backend: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward.

Measured traps (docs/research cpu_env.md): a zero-length q or kv kills the process with SIGFPE (guarded by
the base class), a fully masked row returns lse = 0 (never produced here: only plain or square causal
blocks), the causal mask is top-left aligned, and an input whose LAST dim is strided (e.g. a d-major
copy) silently gives wrong results: every tensor goes in with unit last-dim stride (other strides are
fine, e.g. transposes of [s, b, h, d]). GQA is native, forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._calls import call_aten, has_aten_op, named_returns
from .base import BlockAttention, last_dim_contiguous, lse_dtype_for, register_kernel

__all__ = ["CpuFlashAttention"]

_FWD = "_scaled_dot_product_flash_attention_for_cpu"
_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@register_kernel
class CpuFlashAttention(BlockAttention):
    """PyTorch's fused flash attention for CPU tensors."""

    name = "cpu"

    @classmethod
    def unavailable_reason(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        device = torch.device(device)
        if device.type != "cpu":
            return f"the CPU flash op only runs on CPU tensors, not {device.type}"
        if not (has_aten_op(_FWD) and has_aten_op(_BWD)):
            return f"this torch build ({torch.__version__}) lacks aten.{_FWD} / its backward"
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not supported (supported: {', '.join(map(str, _DTYPES))})"
        if head_dim <= 0:
            return f"head_dim must be positive, got {head_dim}"
        return None

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        op = getattr(torch.ops.aten, _FWD).default
        q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
        res = call_aten(op, {"query": q, "key": k, "value": v, "dropout_p": 0.0, "is_causal": causal, "scale": scale})
        r = named_returns(op, res, ("output", "logsumexp"))
        return r["output"], r["logsumexp"].to(lse_dtype_for(q.dtype)).contiguous(), None

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
        op = getattr(torch.ops.aten, _BWD).default
        values = {
            "grad_out": last_dim_contiguous(dout.to(q.dtype)),
            "query": last_dim_contiguous(q),
            "key": last_dim_contiguous(k),
            "value": last_dim_contiguous(v),
            "out": last_dim_contiguous(out.to(q.dtype)),  # the merged output, in the kernel's dtype
            "logsumexp": lse.to(lse_dtype_for(q.dtype)).contiguous(),
            "dropout_p": 0.0,
            "is_causal": causal,
            "scale": scale,
        }
        dq, dk, dv = call_aten(op, values)[:3]
        return dq, dk, dv
