"""Document-masked blocks: attention where a query sees a key only when both carry the same segment id.

:func:`segmented_block` precomputes, for the segment ids of a block's query rows and key rows, the row sets
of every segment present on both sides, and returns a :class:`SegmentedBlock`: the same
``forward_unchecked`` / ``backward_unchecked`` calls as a :class:`~megatron_tasp.kernels.base.BlockAttention`
(``causal=True`` then means causal inside every segment, in row order), run as one dense kernel call per
shared segment on gathered rows (a slice when the rows are contiguous), scattered back. Segments with no
query or no key rows are skipped: no launch, no FLOPs. Segment rows are handed to the kernel as contiguous
copies (see ``_take``). Query rows without any key get output 0 and lse
-inf, which the log-sum-exp merge weighs 0; their dq is 0, as is the dk/dv of keys no query sees.

A block whose one segment covers every query and key row calls the dense kernel directly (the
single-document case runs exactly the dense path). This is the correctness-first form: on GPU a varlen or
mask-aware kernel (FlexAttention, varlen flash) would run a whole block in one launch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import BlockAttention, lse_dtype_for
from .math_ref import MathAttention

# Segments this small (on either side) run on the math kernel: fused kernels reject some of them (cuDNN:
# "s_q = s_kv = 1 is not supported") and their launch costs more than the arithmetic.
TINY_ROWS = 8

__all__ = ["SegmentedBlock", "put_rows", "row_count", "segment_rows", "segmented_block", "widened"]

Rows = slice | Tensor


def segment_rows(seg: Tensor) -> dict[int, Rows]:
    """Segment id -> its rows in a 1-D tensor of segment ids: a slice where they form one contiguous run, else
    ascending CPU LongTensor indices. Negative ids mark rows that match nothing (rows a block's case leaves out)
    and get no entry. Documents usually are runs, so the common case costs a few tensor ops for the whole block
    instead of a few per document (packed batches change their documents every step)."""
    seg = seg.to("cpu", torch.long)
    n = seg.numel()
    if n == 0:
        return {}
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = seg[1:] != seg[:-1]
    starts = torch.nonzero(change).flatten()
    ids = seg[starts]
    kept = ids[ids >= 0]
    runs: dict[int, Rows] = {}
    if torch.unique(kept).numel() == kept.numel():  # every id is one run
        bounds = starts.tolist() + [n]
        for i, gid in enumerate(ids.tolist()):
            if gid >= 0:
                runs[gid] = slice(bounds[i], bounds[i + 1])
        return runs
    rows = torch.nonzero(seg >= 0).flatten()
    order = rows[torch.sort(seg[rows], stable=True).indices]
    uids, counts = torch.unique_consecutive(seg[order], return_counts=True)
    for gid, idx in zip(uids.tolist(), order.split(counts.tolist())):
        first, last = int(idx[0]), int(idx[-1])
        runs[gid] = slice(first, last + 1) if last - first + 1 == idx.numel() else idx
    return runs


def row_count(rows: Rows) -> int:
    """How many rows a slice or an index tensor names."""
    return rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())


def _as_rows(rows: Rows, device: torch.device) -> Rows:
    """A slice as it is, else the indices on ``device``."""
    return rows if isinstance(rows, slice) else rows.to(device)


def _take(x: Tensor, rows: Rows) -> Tensor:
    """The rows as a contiguous ``[b, h, n, d]`` tensor. Always a copy: cuDNN (torch 2.11, cuDNN 9.19, H200)
    reuses a cached backward plan across stride patterns of equal shapes, and a segment given as a strided view
    got wrong gradients after a per-document SDPA loop of the same shapes had run; one canonical layout per
    shape avoids that (the copy costs bandwidth only)."""
    return (x[:, :, rows] if isinstance(rows, slice) else x.index_select(2, rows)).contiguous()


def put_rows(dst: Tensor, rows: Rows, val: Tensor) -> None:
    """Write ``val`` into the ``rows`` (dim 2) of ``dst``."""
    if isinstance(rows, slice):
        dst[:, :, rows].copy_(val)
    else:
        dst.index_copy_(2, rows, val.to(dst.dtype))


def widened(grads: list[Tensor], new: tuple[Tensor, ...] | list[Tensor]) -> list[Tensor]:
    """The accumulators ``grads``, each in the wider dtype of itself and the matching ``new`` gradient (a kernel
    may return wider gradients than the inputs): accumulate in the widest dtype any segment's kernel returns."""
    return [acc if acc.dtype == torch.promote_types(acc.dtype, gx.dtype) else acc.to(gx.dtype)
            for acc, gx in zip(grads, new)]


class SegmentedBlock:
    """One block of segment-masked attention over a dense kernel (see the module doc)."""

    def __init__(self, kernel: BlockAttention, pairs: list[tuple[Rows, Rows]], full: bool,
                 tiny: list[bool] | None = None, rows: tuple[int, int] | None = None):
        self.kernel = kernel
        self.pairs = pairs  # (query rows, key rows) of every segment present on both sides
        self.rows = rows  # (query rows, key rows) of the whole block, when known
        self.full = full  # one segment covering every row on both sides: the dense kernel as is
        math = MathAttention()
        self.kernels = [math if t else kernel for t in (tiny or [False] * len(pairs))]  # per pair

    @property
    def name(self) -> str:
        """The dense kernel's name."""
        return self.kernel.name

    def forward_unchecked(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                          scale: float) -> tuple[Tensor, Tensor, Any]:
        """out ``[b, h, sq, d]``, lse ``[b, h, sq]`` (-inf on rows without keys) and the per-segment contexts."""
        if self.full:
            return self.kernel.forward_unchecked(q, k, v, causal=causal, scale=scale)
        b, h, sq, d = q.shape
        out = torch.zeros((b, h, sq, d), dtype=q.dtype, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=lse_dtype_for(q.dtype), device=q.device)
        ctxs = []
        for (iq, ik), kern in zip(self.pairs, self.kernels):
            o, l_, c = kern.forward_unchecked(_take(q, iq), _take(k, ik), _take(v, ik), causal=causal, scale=scale)
            put_rows(out, iq, o)
            put_rows(lse, iq, l_)
            ctxs.append(c)
        return out, lse, ctxs

    def backward_unchecked(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           ctx: Any, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """dq, dk, dv of this block from the merged ``out``/``lse`` (zero where no segment is shared)."""
        if self.full:
            return self.kernel.backward_unchecked(dout, q, k, v, out, lse, ctx, causal=causal, scale=scale)
        grads: list[Tensor] = []
        for (iq, ik), c, kern in zip(self.pairs, ctx, self.kernels):
            g = kern.backward_unchecked(_take(dout, iq), _take(q, iq), _take(k, ik), _take(v, ik),
                                        _take(out, iq), _take(lse, iq), c, causal=causal, scale=scale)
            if not grads:
                grads = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
            grads = widened(grads, g)
            for dst, rows, val in zip(grads, (iq, ik, ik), g):
                put_rows(dst, rows, val)
        if not grads:
            grads = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        return grads[0], grads[1], grads[2]


def segmented_block(kernel: BlockAttention, seg_q: Tensor, seg_k: Tensor, device: torch.device) -> SegmentedBlock:
    """The block of ``kernel`` masked to equal segment ids (``seg_q`` per query row, ``seg_k`` per key row;
    1-D integer tensors); index sets live on ``device``."""
    qs, ks = segment_rows(seg_q), segment_rows(seg_k)
    shared = [g for g in qs if g in ks]
    # one segment over every row on both sides (rows with negative ids have no entry, so count the rows)
    full = (len(qs) == 1 and len(ks) == 1 and len(shared) == 1 and row_count(qs[shared[0]]) == seg_q.numel()
            and row_count(ks[shared[0]]) == seg_k.numel())
    pairs = [(_as_rows(qs[g], device), _as_rows(ks[g], device)) for g in shared]
    tiny = [min(row_count(qs[g]), row_count(ks[g])) < TINY_ROWS and kernel.name != "math" for g in shared]
    return SegmentedBlock(kernel, pairs, full, tiny, rows=(seg_q.numel(), seg_k.numel()))
