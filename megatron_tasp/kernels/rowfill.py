"""Fill whole rows of a tensor, given their indices: one Triton kernel on CUDA, ``index_fill_`` elsewhere.

The varlen blocks write the rows without a partner themselves (output and dQ of queries without keys, dK/dV of
keys without queries; :mod:`megatron_tasp.kernels.varlen`): at CP=2 that is half the rows of a remote block.
torch's ``index_fill_`` computes an element offset per element and ran at about a quarter of the H200's write
bandwidth there (90 us for half the rows of a ``[16K, 32, 128]`` bf16 output, more than zero-filling all of
it, 42 us); a kernel that stores each row as one contiguous run took 35 us, and 83 against 349 us at 64K rows
(``docs/PERFORMANCE.md``, packed item 14).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import lazy_triton

__all__ = ["fill_rows_"]

_BLOCK = 1024  # elements per program along a row


@lazy_triton
def _kernel(triton, tl):
    """The compiled kernel and the helper its launch needs (False where Triton cannot be imported: index_fill_)."""

    @triton.jit
    def _fill(x, rows, row_stride, row_len, value, BLOCK: tl.constexpr):
        row = tl.load(rows + tl.program_id(0)).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        fill = tl.full([BLOCK], value, x.dtype.element_ty)
        tl.store(x + row * row_stride + cols, fill, mask=cols < row_len)

    return _fill, triton.cdiv


def fill_rows_(x: Tensor, rows: Tensor, value: float) -> Tensor:
    """``x.index_fill_(0, rows, value)``: every index in ``rows`` (int64, on x's device, within range) names a
    row ``x[i]`` to set to ``value``. One Triton kernel when x is on CUDA and each of its rows is one contiguous
    run of memory (any row stride: the halves of a ``[rows, 2, h, d]`` buffer qualify); otherwise torch's op."""
    if rows.numel() == 0 or x.numel() == 0:
        return x
    kern = _kernel() if x.is_cuda else False
    if not kern or x.dim() < 1 or not x[0].is_contiguous() or x.dtype not in (torch.float16, torch.bfloat16,
                                                                                torch.float32):
        return x.index_fill_(0, rows, value)
    fn, cdiv = kern
    row_len = x[0].numel()
    fn[(rows.numel(), cdiv(row_len, _BLOCK))](x, rows, x.stride(0), row_len, float(value), BLOCK=_BLOCK)
    return x
