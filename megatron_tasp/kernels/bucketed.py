"""Large causal documents on the dense kernel at a bounded set of shapes.

cuDNN's dense attention outruns FlashAttention-2's varlen kernel by ~1.4x on a large document on Hopper (the
varlen launch may itself run on cuDNN's ragged form now: ``TaspOptions.packed_kernel``), but builds an
execution plan for every new (rows, keys) shape it sees; with packed documents whose lengths change every step
that planning costs more than the kernel saves. :class:`BucketedBlock` runs each large segment of a causal block
whose queries and keys are the same document rows (the own block of packed documents) as its own dense call, with
the rows zero-padded at their end up to :func:`bucket_rows` (at most ``PER_OCTAVE`` shapes per power of two), so
the kernel sees a bounded set of shapes whatever the documents.

Exact under the causal mask: the padding follows every real row, so no real query sees a padded key. A padded
query's output and lse are dropped; in the backward its dout is 0 and its lse +inf (attention weights 0), so it
adds nothing to dK/dV. Each call pads into fresh contiguous buffers (one layout per shape; see
``segmented._take`` for why cuDNN must not see strided views of equal shapes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import BlockAttention, lse_dtype_for
from .segmented import Rows, put_rows, row_count, widened

__all__ = ["PER_OCTAVE", "BucketedBlock", "bucket_rows", "is_dense"]

#: padded shapes per power of two: from 1024 rows on, the padding adds at most 1/PER_OCTAVE of the rows (about
#: twice that share of the causal FLOPs); below, rows round up to a multiple of 128
PER_OCTAVE = 8
_MIN_STEP = 128


def bucket_rows(n: int) -> int:
    """``n`` rounded up to the next of :data:`PER_OCTAVE` evenly spaced sizes between two powers of two (a
    multiple of 128 at least)."""
    if n <= 0:
        raise ValueError(f"bucket_rows needs a positive row count, got {n}")
    step = max(_MIN_STEP, 1 << max(0, n.bit_length() - 1 - (PER_OCTAVE.bit_length() - 1)))
    return -(-n // step) * step


def is_dense(q_rows: int, k_rows: int, dense_rows: int | None) -> bool:
    """Whether a segment of a causal own block with these row counts runs bucketed on the dense kernel: square
    and at least ``dense_rows`` rows (None: never)."""
    return dense_rows is not None and q_rows == k_rows >= dense_rows


def _padded(x: Tensor, rows: Rows, size: int, fill: float = 0.0) -> Tensor:
    """The ``rows`` of ``x`` (``[b, h, s, ...]``, rows on dim 2) in a fresh contiguous tensor of ``size`` rows,
    the rest ``fill``."""
    n = row_count(rows)
    buf = torch.empty((*x.shape[:2], size, *x.shape[3:]), dtype=x.dtype, device=x.device)
    buf[:, :, :n] = x[:, :, rows] if isinstance(rows, slice) else x.index_select(2, rows)
    buf[:, :, n:] = fill  # only the padding is filled
    return buf


class BucketedBlock:
    """Square causal segments (the same number of query and key rows, causal within each) as one dense-kernel
    call each on bucket-padded copies; every other row of the block gets output 0, lse -inf and zero gradients
    (another kernel covers those rows)."""

    def __init__(self, kernel: BlockAttention, pairs: list[tuple[Rows, Rows]]):
        for iq, ik in pairs:
            if row_count(iq) != row_count(ik):
                raise ValueError(f"bucketed segments must be square (causal own-block documents), got "
                                 f"{row_count(iq)} query and {row_count(ik)} key rows")
        self.kernel = kernel
        self.pairs = pairs

    @property
    def name(self) -> str:
        """The dense kernel's name."""
        return self.kernel.name

    @staticmethod
    def check(causal: bool) -> None:
        """Raise unless called causal (the only mask under which the padding is exact)."""
        if not causal:
            raise RuntimeError("bucketed document segments are exact only under the causal mask (padded keys "
                               "would be seen); this block was built for a causal call")

    def forward_into(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, scale: float) -> list:
        """Write the segments' output and lse rows into ``out`` ``[b, h, sq, d]`` and ``lse`` ``[b, h, sq]``
        (other rows untouched); the per-segment contexts."""
        ctxs = []
        for iq, ik in self.pairs:
            n = row_count(iq)
            size = bucket_rows(n)
            o, l_, c = self.kernel.forward_unchecked(_padded(q, iq, size), _padded(k, ik, size), _padded(v, ik, size),
                                                     causal=True, scale=scale)
            put_rows(out, iq, o[:, :, :n])
            put_rows(lse, iq, l_[:, :, :n])
            ctxs.append(c)
        return ctxs

    def backward_into(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, ctx: list,
                      grads: list[Tensor], *, scale: float) -> list[Tensor]:
        """Write the segments' dq, dk, dv rows (from the merged ``out``/``lse``) into ``grads`` (other rows
        untouched; a tensor narrower than the kernel's gradient is replaced by a widened copy); the gradients."""
        for (iq, ik), c in zip(self.pairs, ctx):
            n = row_count(iq)
            size = bucket_rows(n)
            g = self.kernel.backward_unchecked(
                _padded(dout, iq, size), _padded(q, iq, size), _padded(k, ik, size), _padded(v, ik, size),
                _padded(out, iq, size), _padded(lse, iq, size, float("inf")), c, causal=True, scale=scale)
            grads = widened(grads, g)
            for dst, rows, val in zip(grads, (iq, ik, ik), g):
                put_rows(dst, rows, val[:, :, :n])
        return grads

    def forward_unchecked(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                          scale: float) -> tuple[Tensor, Tensor, Any]:
        """out ``[b, h, sq, d]`` and lse ``[b, h, sq]`` of the segments' rows (0 / -inf elsewhere), contexts."""
        self.check(causal)
        b, h, sq, d = q.shape
        out = torch.zeros((b, h, sq, d), dtype=q.dtype, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=lse_dtype_for(q.dtype), device=q.device)
        return out, lse, self.forward_into(q, k, v, out, lse, scale=scale)

    def backward_unchecked(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           ctx: Any, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """dq, dk, dv of the segments' rows from the merged ``out``/``lse`` (zero elsewhere)."""
        self.check(causal)
        grads = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        dq, dk, dv = self.backward_into(dout, q, k, v, out, lse, ctx, grads, scale=scale)
        return dq, dk, dv
