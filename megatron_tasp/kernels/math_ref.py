"""The "math" backend: plain PyTorch, float32 compute on any device; the oracle and last-resort fallback.

GQA is handled by broadcasting (q viewed as ``[b, h_kv, g, sq, d]`` against ``[b, h_kv, 1, sk, d]``), so K/V
are never expanded. Memory is O(b * h * sq * sk) float32: fine for tests and moderate blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import BlockAttention, lse_dtype_for, register_kernel

__all__ = ["MathAttention"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Grouped q ``[b,hk,g,sq,d]`` and masked scores ``[b,hk,g,sq,sk]`` in the compute dtype."""
    h_kv = k.shape[1]
    qg = q.to(cdt).unflatten(1, (h_kv, q.shape[1] // h_kv))
    kg = k.to(cdt).unsqueeze(2)
    s = torch.matmul(qg, kg.transpose(-1, -2)).mul_(scale)
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu_(1)  # top-left aligned
        s.masked_fill_(mask, float("-inf"))
    return qg, s


@register_kernel
class MathAttention(BlockAttention):
    """Reference attention with explicit formulas (softmax forward, dS = P * (dP - D) backward)."""

    name = "math"

    @classmethod
    def unavailable_reason(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        device = torch.device(device)
        if not dtype.is_floating_point:
            return f"dtype {dtype} is not a floating-point type"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available in this process"
        if head_dim <= 0:
            return f"head_dim must be positive, got {head_dim}"
        return None

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        cdt = _compute_dtype(q.dtype)
        _, s = _scores(q, k, causal, scale, cdt)
        lse = torch.logsumexp(s, dim=-1)  # [b,hk,g,sq]
        p = torch.exp(s.sub_(lse.unsqueeze(-1)))
        out = torch.matmul(p, v.to(cdt).unsqueeze(2))  # [b,hk,g,sq,d]
        out = out.flatten(1, 2).to(q.dtype)
        lse = lse.flatten(1, 2).to(lse_dtype_for(q.dtype)).contiguous()
        return out, lse, None

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
        cdt = _compute_dtype(q.dtype)
        h_kv = k.shape[1]
        g = q.shape[1] // h_kv
        qg, s = _scores(q, k, causal, scale, cdt)
        lse_g = lse.to(cdt).unflatten(1, (h_kv, g)).unsqueeze(-1)
        p = torch.exp(s.sub_(lse_g))  # this block's share of the GLOBAL softmax (merged lse)
        do = dout.to(cdt).unflatten(1, (h_kv, g))
        o = out.to(cdt).unflatten(1, (h_kv, g))
        delta = (do * o).sum(dim=-1, keepdim=True)  # D = rowsum(dO * O), O the merged output
        kg = k.to(cdt).unsqueeze(2)
        vg = v.to(cdt).unsqueeze(2)
        dv = torch.matmul(p.transpose(-1, -2), do).sum(dim=2)
        dp = torch.matmul(do, vg.transpose(-1, -2))
        ds = p.mul_(dp.sub_(delta))  # dS = P * (dP - D); p is not needed afterwards
        dq = torch.matmul(ds, kg).mul_(scale).flatten(1, 2)
        dk = torch.matmul(ds.transpose(-1, -2), qg).sum(dim=2).mul_(scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
