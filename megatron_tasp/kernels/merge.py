"""Merging partial attention results with log-sum-exp, in float32, in place.

With accumulators initialised to ``out_acc = 0`` and ``lse_acc = -inf``, merging the block results of any
partition of the keys, in any order, gives the attention over all of them::

    lse_new = logaddexp(lse_acc, lse_blk)
    out_acc = out_acc * exp(lse_acc - lse_new) + out_blk * exp(lse_blk - lse_new)

Both weights are in [0, 1] and the formula is symmetric in (acc, blk), so the order of arrival only changes
rounding. Rows where both lse are -inf stay (out 0, lse -inf) with no NaN. The accumulators may be views
(e.g. ``out_acc[:, :, s // 2:]``) so a block that only some queries see merges into those rows only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .fused_merge import merge_to

__all__ = ["merge_into", "new_accumulators"]


def new_accumulators(
    q_shape: Sequence[int] | Tensor,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Fresh ``(out_acc [b,h,s,d] = 0, lse_acc [b,h,s] = -inf)`` in ``dtype`` (float32 by default).

    ``q_shape`` is the query shape ``(b, h, s, d)`` or a query tensor (its shape, and its device unless
    ``device`` is given).
    """
    if isinstance(q_shape, Tensor):
        device = q_shape.device if device is None else device
        q_shape = q_shape.shape
    shape = tuple(int(x) for x in q_shape)
    if len(shape) != 4:
        raise ValueError(f"q_shape must be (b, h, s, d), got {shape}")
    out_acc = torch.zeros(shape, dtype=dtype, device=device)
    lse_acc = torch.full(shape[:3], float("-inf"), dtype=dtype, device=device)
    return out_acc, lse_acc


def merge_into(out_acc: Tensor, lse_acc: Tensor, out_blk: Tensor, lse_blk: Tensor) -> None:
    """Merge one block result ``(out_blk [b,h,s,d], lse_blk [b,h,s])`` into the accumulators, in place.

    ``out_acc``/``lse_acc`` are floating tensors (float32 recommended) or views of them; ``out_blk`` may be in
    any floating dtype (e.g. bf16 straight from a kernel).
    """
    if out_acc.dim() != 4 or lse_acc.shape != out_acc.shape[:3]:
        raise ValueError(
            f"accumulators must be out [b,h,s,d] and lse [b,h,s], got {tuple(out_acc.shape)} and {tuple(lse_acc.shape)}"
        )
    if out_blk.shape != out_acc.shape or lse_blk.shape != lse_acc.shape:
        raise ValueError(
            f"block result {tuple(out_blk.shape)}/{tuple(lse_blk.shape)} does not match the accumulators "
            f"{tuple(out_acc.shape)}/{tuple(lse_acc.shape)}"
        )
    if not (out_acc.is_floating_point() and lse_acc.is_floating_point()):
        raise ValueError("accumulators must be floating point (float32 recommended)")
    with torch.no_grad():
        lse_b = lse_blk.to(lse_acc.dtype)
        lse_new = torch.logaddexp(lse_acc, lse_b)
        # Where both inputs are -inf, lse_new is -inf too; use 0 as the reference so both weights are exp(-inf)=0.
        ref = torch.where(torch.isneginf(lse_new), torch.zeros_like(lse_new), lse_new)
        w_acc = torch.exp(lse_acc - ref).unsqueeze(-1).to(out_acc.dtype)
        w_blk = torch.exp(lse_b - ref).unsqueeze(-1).to(out_acc.dtype)
        out_acc.mul_(w_acc).add_(out_blk.to(out_acc.dtype) * w_blk)
        lse_acc.copy_(lse_new)


def merge_finite_(out_acc: Tensor, lse_acc: Tensor, out_blk: Tensor, lse_blk: Tensor) -> None:
    """In-place merge for accumulators whose lse is already finite everywhere (no ``where()``).

    ``out_acc += sigmoid(lse_blk - lse_acc) * (out_blk - out_acc)``, ``lse_acc += softplus(lse_blk - lse_acc)``;
    a block row with ``lse_blk = -inf`` gets weight 0. This is :func:`fused_merge.merge_to` with the
    accumulators as destination (one Triton kernel on CUDA). TASP initialises the accumulators from the
    step-0 block (every query sees its own token), so the precondition holds there; use :func:`merge_into`
    when it may not.
    """
    merge_to(out_acc, lse_acc, out_blk, lse_blk, out_acc, lse_acc)
