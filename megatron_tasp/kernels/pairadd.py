"""Add the halves of a ``[m, 2, ...]`` buffer to two tensors: one Triton kernel on CUDA, ``torch.add`` elsewhere.

The backward's hop home brings a rank's dK/dV from its peers as one ``[m, 2, h, d]`` piece buffer; the own
block's dK and dV are added to its two halves (:func:`megatron_tasp.engine.backward.home_sum`). A half of that
buffer is not contiguous, so torch runs each add with its strided (not vectorized) kernel: about 50 us each for
a ``[16K, 8, 128]`` bf16 pair on the H200, where reading and writing the bytes takes about half of that. This
kernel reads each row of each half as one contiguous run and does both adds in one launch
(``docs/PERFORMANCE.md``, packed item 15). The arithmetic is torch's: fp32 math, one rounding to the dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import lazy_triton

__all__ = ["add_halves"]

_BLOCK = 1024  # elements per program along a row


@lazy_triton
def _kernel(triton, tl):
    """The compiled kernel and the helper its launch needs (False where Triton cannot be imported: torch.add)."""

    @triton.jit
    def _add(a0, a1, pair, out0, out1, pair_row, pair_half, row_len, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < row_len
        at = row * row_len + cols
        p = pair + row * pair_row + cols
        x0 = tl.load(a0 + at, mask=keep).to(tl.float32) + tl.load(p, mask=keep).to(tl.float32)
        x1 = tl.load(a1 + at, mask=keep).to(tl.float32) + tl.load(p + pair_half, mask=keep).to(tl.float32)
        tl.store(out0 + at, x0.to(out0.dtype.element_ty), mask=keep)
        tl.store(out1 + at, x1.to(out1.dtype.element_ty), mask=keep)

    return _add, triton.cdiv


def _fits(a0: Tensor, a1: Tensor, pair: Tensor) -> bool:
    """True when the Triton kernel takes these tensors: one dtype, a0/a1 contiguous of one shape ``[m, ...]``,
    pair ``[m, 2, ...]`` whose every ``pair[i, j]`` is one contiguous run."""
    return (a0.dtype == a1.dtype == pair.dtype and a0.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and a0.shape == a1.shape and pair.dim() == a0.dim() + 1 and pair.shape[0] == a0.shape[0]
            and pair.shape[1] == 2 and tuple(pair.shape[2:]) == tuple(a0.shape[1:]) and a0.is_contiguous()
            and a1.is_contiguous() and pair.numel() > 0 and pair[0, 0].is_contiguous())


def add_halves(a0: Tensor, a1: Tensor, pair: Tensor) -> tuple[Tensor, Tensor]:
    """``(a0 + pair[:, 0], a1 + pair[:, 1])`` as new contiguous tensors (torch's type promotion). One Triton kernel
    for both when the tensors are on CUDA and share one floating dtype, a0 and a1 are contiguous and every
    ``pair[i, j]`` is one contiguous run; otherwise two ``torch.add`` calls."""
    kern = _kernel() if a0.is_cuda and _fits(a0, a1, pair) else False
    if not kern:
        return torch.add(a0, pair[:, 0]), torch.add(a1, pair[:, 1])
    fn, cdiv = kern
    out0, out1 = torch.empty_like(a0), torch.empty_like(a1)
    row_len = a0[0].numel()
    fn[(a0.shape[0], cdiv(row_len, _BLOCK))](a0, a1, pair, out0, out1, pair.stride(0), pair.stride(1), row_len,
                                              BLOCK=_BLOCK)
    return out0, out1
