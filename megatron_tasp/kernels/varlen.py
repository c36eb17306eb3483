"""Document-masked blocks in ONE kernel launch: a variable-length attention pair over the block's rows.

A :class:`~megatron_tasp.kernels.segmented.SegmentedBlock` runs one dense kernel call per document of a block. On
CUDA with fp16/bf16 inputs, :class:`VarlenBlock` runs the block's small segments as one call of a
:class:`VarlenOps` pair with ``cu_seqlens``: here torch's ``aten._flash_attention_forward`` /
``_flash_attention_backward`` (FlashAttention-2 inside torch); cuDNN's ragged attention is the other pair
(:mod:`megatron_tasp.kernels.cudnn_varlen`). When every shared segment is one run of rows on both sides and the
segments ascend on both sides (the own block of packed documents, and the remote block of CP=2 in THD order), the
call reads q/k/v and writes out, lse and the gradients IN PLACE: the rows between the shared segments become
segments with no partner, which both pairs serve without computing anything (they exit early on an empty side);
the block itself writes their results (queries with no keys: output 0, lse -inf, dq 0; keys with no queries:
dk/dv 0), whatever the pair left in those rows. A pair that takes *spans* (:attr:`VarlenOps.spans`: cuDNN's,
whose segments may start at any row) gets the shared segments alone instead, so it does no per-row work for
the rows without a partner (about half the rows of a CP=2 remote block). Otherwise the query rows of every
shared segment are gathered into one packed ``[total_q, h, d]`` tensor (segment after segment; a view, not a
copy, when they already form one ascending run), likewise the key/value rows, and the output, lse and gradients
are scattered back. Rows without keys keep output 0 and lse -inf, exactly as in the segmented block. GQA/MQA
runs natively (fewer KV heads), no expansion. Square segments of at least ``big_rows`` rows (the engine passes
``TaspOptions.packed_dense_rows`` for the own block of causal calls only, None otherwise) run one call each on the
dense kernel, padded to a bounded set of shapes (:mod:`megatron_tasp.kernels.bucketed`: exact under the causal
mask, and cuDNN plans once per shape); every query row and key row belongs to one segment, so the two parts write
disjoint rows of the same outputs and gradients (such blocks gather the rest).

What it needs, checked per call (otherwise the same block runs on the per-document fallback): a CUDA
tensor of fp16 or bf16, head dim a multiple of 8 and at most 256, batch 1 (packed documents are ``[t, 1,
h, d]``), and the op in this torch build. ``causal=True`` appears only on square segments (the own block of
packed documents: the same rows on both sides), so the op's causal alignment convention does not matter; the
one exception, a span one query row longer (:attr:`VarlenOps.even_spans`, cuDNN's pair only), is top-left.

The two ops are a :class:`VarlenOps` (a pair of functions of plain tensors, plus what inputs they refuse),
an argument of each block: ``ops=None`` is torch's flash pair (:func:`flash_varlen_ops`). There is no
process-wide switch; the engine picks the ops in one function (``megatron_tasp.engine.thd._varlen_ops``),
which tests replace (pytest's monkeypatch) with a float64 reference so the gather/scatter plumbing runs on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ._calls import call_aten, has_aten_op, named_returns
from .bucketed import BucketedBlock, is_dense
from .rowfill import fill_rows_
from .segmented import Rows, SegmentedBlock, row_count

__all__ = ["VarlenBlock", "VarlenOps", "flash_varlen_ops", "spans_of", "varlen_reason"]

_FLASH_DTYPES = (torch.float16, torch.bfloat16)

@dataclass(frozen=True)
class VarlenOps:
    """``forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out [tq,h,d], lse [h,tq] fp32, aux)`` and
    ``backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, aux) -> (dq, dk, dv)``;
    tensors packed ``[total, heads, d]``. ``reason(q)``: why these ops cannot take the block's query tensor
    ``[b, h, s, d]`` (None: they can; ``reason=None``: they take any)."""

    forward: Any
    backward: Any
    reason: Callable[[Tensor], str | None] | None = None
    #: None: the pair takes ``cu_seqlens`` only. Else, per query tensor ``[rows, h, d]``: whether the pair takes
    #: *spans* in their place, int32 ``[n, 2]`` (first row, row past the last) per segment and side, which need
    #: not be back to back: an in-place block then lists its shared segments only, and rows outside every span
    #: are never touched (see :func:`spans_of`)
    spans: Callable[[Tensor], bool] | None = None
    #: the pair's per-row kernels run faster when every query span has an even number of rows (cuDNN's dot(dO, O)
    #: took 1.47x as long over a CP=2 rank's own block at 32K with some odd spans, on the H200): an in-place
    #: block then lends each odd span one adjacent row without a partner (see :class:`_Spans`)
    even_spans: bool = False

    # Segments may be empty on one side (the in-place form). The pair may leave the rows of such segments unset
    # (output and lse of queries without keys, dq of them, dk/dv of keys without queries): the block writes 0
    # there (lse -inf) itself. FlashAttention-2 writes 0 (lse +inf); cuDNN leaves the output rows untouched.

    def takes_spans(self, q: Tensor) -> bool:
        """True when this call (query tensor ``q``) takes spans instead of ``cu_seqlens``."""
        return self.spans is not None and bool(self.spans(q))


def spans_of(bounds: Tensor) -> tuple[Tensor, Tensor]:
    """(first rows, lengths) of the segments of ``bounds``: ``cu_seqlens`` ``[n + 1]`` (back to back) or spans
    ``[n, 2]`` (first row, row past the last)."""
    b = bounds.long()
    if b.dim() == 2:
        return b[:, 0], b[:, 1] - b[:, 0]
    return b[:-1], b[1:] - b[:-1]


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                   causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
    op = torch.ops.aten._flash_attention_forward.default
    res = call_aten(op, {"query": q, "key": k, "value": v, "cum_seq_q": cu_q, "cum_seq_k": cu_k, "max_q": max_q,
                         "max_k": max_k, "dropout_p": 0.0, "is_causal": causal, "return_debug_mask": False,
                         "scale": scale})
    named = named_returns(op, res, ("output", "logsumexp", "philox_seed", "philox_offset", "debug_attn_mask"))
    lse = named["logsumexp"]
    if lse.dim() != 2 or tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"_flash_attention_forward (varlen) on torch {torch.__version__} returned a logsumexp "
                           f"of shape {tuple(lse.shape)}; expected (heads, total_q) = ({q.shape[1]}, {q.shape[0]})")
    return named["output"], lse, (named["philox_seed"], named["philox_offset"])


def _flash_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                    cu_k: Tensor, max_q: int, max_k: int, causal: bool, scale: float,
                    aux: Any) -> tuple[Tensor, Tensor, Tensor]:
    op = torch.ops.aten._flash_attention_backward.default
    res = call_aten(op, {"grad_out": dout, "query": q, "key": k, "value": v, "out": out, "logsumexp": lse,
                         "cum_seq_q": cu_q, "cum_seq_k": cu_k, "max_q": max_q, "max_k": max_k, "dropout_p": 0.0,
                         "is_causal": causal, "philox_seed": aux[0], "philox_offset": aux[1], "scale": scale})
    return res[0], res[1], res[2]


def _flash_reason(q: Tensor) -> str | None:
    if q.device.type != "cuda":
        return "needs CUDA"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "FlashAttention-2 needs compute capability >= 8.0"
    if not has_aten_op("_flash_attention_forward"):
        return f"torch {torch.__version__} has no _flash_attention_forward"
    if q.dtype not in _FLASH_DTYPES:
        return f"dtype {q.dtype} (flash takes fp16/bf16)"
    d = q.shape[-1]
    if d % 8 or d > 256:
        return f"head dim {d} (flash takes multiples of 8 up to 256)"
    return None


_FLASH_OPS = VarlenOps(_flash_forward, _flash_backward, _flash_reason)  # frozen: shared, never changed


def flash_varlen_ops() -> VarlenOps:
    """torch's FlashAttention-2 varlen forward/backward."""
    return _FLASH_OPS


def varlen_reason(q: Tensor, k: Tensor, ops: VarlenOps | None = None) -> str | None:
    """None when ``ops`` (None: the flash pair) can run this block's tensors, else why not."""
    ops = _FLASH_OPS if ops is None else ops
    reason = ops.reason(q) if ops.reason is not None else None
    if reason is not None:
        return reason
    if q.shape[0] != 1 or k.shape[0] != 1:
        return "batch > 1"
    return None


def _index(rows: list[Rows], device: torch.device) -> tuple[slice | Tensor, Tensor, int]:
    """(one slice or LongTensor of the concatenated rows, int32 cu_seqlens, longest segment)."""
    lengths = [row_count(r) for r in rows]
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    if rows and all(isinstance(r, slice) for r in rows) and all(
            a.stop == b.start for a, b in zip(rows, rows[1:])):  # back to back: one slice, no index tensor
        return slice(rows[0].start, rows[-1].stop), cu.to(device), max(lengths)
    # otherwise the rows are no single ascending run (segment_rows gives a slice to every contiguous segment)
    parts = [torch.arange(r.start, r.stop) if isinstance(r, slice) else r.cpu() for r in rows]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return flat.to(device), cu.to(device), max(lengths, default=0)


@dataclass(frozen=True)
class _Partnerless:
    """Rows of an in-place launch whose segment is empty on the other side, which the block writes itself:
    queries without keys and keys without queries (row indices, or None when there are none)."""

    q_rows: Tensor | None
    k_rows: Tensor | None


def _rows_of(slices: list[slice], device: torch.device) -> Tensor | None:
    return torch.cat([torch.arange(r.start, r.stop) for r in slices]).to(device) if slices else None


@dataclass(frozen=True)
class _Spans:
    """The shared segments of an in-place block alone, as spans (:attr:`VarlenOps.spans`): no segments for the
    rows without a partner, so a pair that takes spans does no per-row work for them."""

    q: Tensor  # [n, 2] int32 (first row, row past the last)
    k: Tensor
    max_q: int
    max_k: int
    #: query rows without a partner lent to odd spans (:attr:`VarlenOps.even_spans`), or None. The launch computes
    #: them as queries of the span; the block overwrites their results as for every row without a partner
    #: (output 0, lse -inf; dq 0) and gives the backward lse +inf there, so their attention weights are exactly 0
    #: and they add nothing to dK/dV (for a finite incoming gradient: 0 times NaN is NaN)
    borrowed: Tensor | None = None


def _spans(pairs: list[tuple[slice, slice]], device: torch.device) -> _Spans:
    q = torch.tensor([[iq.start, iq.stop] for iq, _ in pairs], dtype=torch.int32).reshape(-1, 2)
    k = torch.tensor([[ik.start, ik.stop] for _, ik in pairs], dtype=torch.int32).reshape(-1, 2)
    return _Spans(q.to(device), k.to(device), max(iq.stop - iq.start for iq, _ in pairs),
                  max(ik.stop - ik.start for _, ik in pairs))


def _evened(pairs: list[tuple[slice, slice]], lonely: list[slice], rows: int,
            front: bool) -> tuple[list[list[int]], list[int]]:
    """(query spans, lent rows): the pairs' query spans, each odd one given one adjacent row of ``lonely`` (query
    rows without a partner, each lent once): the row after the span, or with ``front`` the row before it (only
    where the mask is not causal: a row in front would shift the causal diagonal). Host lists."""
    free = bytearray(rows)
    for r in lonely:
        free[r.start:r.stop] = b"\x01" * (r.stop - r.start)
    q, borrowed = [], []
    for iq, _ in pairs:
        a, b = iq.start, iq.stop
        if (b - a) % 2 and b < rows and free[b]:
            free[b] = 0
            borrowed.append(b)
            b += 1
        elif (b - a) % 2 and front and a > 0 and free[a - 1]:
            free[a - 1] = 0
            borrowed.append(a - 1)
            a -= 1
        q.append([a, b])
    return q, sorted(borrowed)


def _in_place(pairs: list[tuple[Rows, Rows]], rows: tuple[int, int] | None, device: torch.device,
              even: bool = False) -> tuple[tuple, tuple, _Partnerless, _Spans, dict[bool, _Spans]] | None:
    """Segments over EVERY row, for pairs that are slices ascending on both sides: ((slice, cu_q, max_q),
    (slice, cu_k, max_k), the rows without a partner, the pairs alone as spans, the spans a launch takes per
    ``causal``: with ``even``, odd query spans lent a row without a partner, see :func:`_evened`). Rows outside
    the pairs become segments with an empty partner: queries without keys, then keys without queries. None when
    the pairs do not allow it (a gather is needed) or the block's size is unknown."""
    if rows is None or not pairs:
        return None
    seg_q: list[Rows] = []
    seg_k: list[Rows] = []
    lonely: list[slice] = []
    lonely_k: list[slice] = []
    at_q = at_k = 0
    for iq, ik in pairs:
        if not (isinstance(iq, slice) and isinstance(ik, slice)) or iq.start < at_q or ik.start < at_k:
            return None
        if iq.start > at_q:  # queries without keys
            lonely.append(slice(at_q, iq.start))
            seg_q.append(lonely[-1])
            seg_k.append(slice(at_k, at_k))
        if ik.start > at_k:  # keys without queries
            lonely_k.append(slice(at_k, ik.start))
            seg_q.append(slice(iq.start, iq.start))
            seg_k.append(lonely_k[-1])
        seg_q.append(iq)
        seg_k.append(ik)
        at_q, at_k = iq.stop, ik.stop
    if at_q > rows[0] or at_k > rows[1]:
        return None
    if at_q < rows[0]:
        lonely.append(slice(at_q, rows[0]))
        seg_q.append(lonely[-1])
        seg_k.append(slice(at_k, at_k))
    if at_k < rows[1]:
        lonely_k.append(slice(at_k, rows[1]))
        seg_q.append(slice(rows[0], rows[0]))
        seg_k.append(lonely_k[-1])
    q_side, k_side = _index(seg_q, device), _index(seg_k, device)  # back to back: one slice each side
    if q_side[2] <= 1:
        # FlashAttention-2 (torch's flash_api) runs a GQA call whose longest query segment has one row in a
        # swapped layout, reshaped by segment count (it fails once segments outnumber the query rows); empty
        # segments are not checked in that layout on GPU: gather instead
        return None
    spans = _spans(pairs, device)
    launch = {True: spans, False: spans}
    if even:  # the key spans stay; one device copy per distinct result (causal: lent after the span only)
        made: dict[tuple, _Spans] = {}
        for causal in (True, False):
            q, lent = _evened(pairs, lonely, rows[0], not causal)
            key = tuple(map(tuple, q))
            if lent and key not in made:
                made[key] = replace(spans, q=torch.tensor(q, dtype=torch.int32).to(device),
                                    max_q=max(b - a for a, b in q), borrowed=torch.tensor(lent).to(device))
            launch[causal] = made[key] if lent else spans
    return (q_side, k_side, _Partnerless(_rows_of(lonely, device), _rows_of(lonely_k, device)), spans, launch)


def _first(rows: Rows) -> int:
    return rows.start if isinstance(rows, slice) else int(rows[0])


def _packed(x: Tensor, index: slice | Tensor) -> Tensor:
    """Rows of ``x [1, h, s, d]`` as a packed ``[rows, h, d]`` tensor (a view for a slice of a row-major x)."""
    rows = x[0].transpose(0, 1)  # [s, h, d]
    return rows[index] if isinstance(index, slice) else rows.index_select(0, index)


def _unpacked(val: Tensor, index: slice | Tensor, s: int, fill: float = 0.0) -> Tensor:
    """Packed ``[rows, h, d]`` back to ``[1, h, s, d]``, other rows ``fill``."""
    if isinstance(index, slice) and index.start == 0 and index.stop == s:
        return val.transpose(0, 1).unsqueeze(0)
    full = torch.full((s, *val.shape[1:]), fill, dtype=val.dtype, device=val.device).transpose(0, 1).unsqueeze(0)
    _scatter(full, index, val)
    return full


def _scatter(dst: Tensor, index: slice | Tensor, val: Tensor) -> None:
    """Write packed ``[rows, h, d]`` into the rows ``index`` of ``dst [1, h, s, d]``."""
    rows = dst[0].transpose(0, 1)
    if isinstance(index, slice):
        rows[index] = val
    else:
        rows.index_copy_(0, index, val)


class VarlenBlock:
    """One document-masked block as one varlen kernel call (see the module doc); falls back to the
    per-document :class:`SegmentedBlock` for inputs the varlen op cannot take. ``big_rows``: square segments of
    at least that many rows run on the dense kernel, bucket-padded (None: none; only for blocks called with
    ``causal=True``); ``ops``: the varlen pair (None: :func:`flash_varlen_ops`). ``merged``: the block's output
    only ever goes to :func:`~megatron_tasp.kernels.fused_merge.merge_to`, which reads no row whose lse is -inf,
    so the output rows of queries without keys are left as the pair leaves them (unset with cuDNN's) instead of
    being zeroed; their lse is -inf either way."""

    def __init__(self, fallback: SegmentedBlock, device: torch.device, big_rows: int | None = None,
                 ops: VarlenOps | None = None, merged: bool = False):
        self.fallback = fallback
        self.merged = merged
        self.ops = flash_varlen_ops() if ops is None else ops
        self.big_rows = big_rows
        self.pairs = fallback.pairs
        self.full = fallback.full
        # square segments of >= big_rows rows run one call each on the dense kernel (on Hopper cuDNN's kernel
        # outruns FlashAttention-2 by ~1.4x, which repays a launch per large document), padded to a bucket
        is_big = [is_dense(row_count(iq), row_count(ik), big_rows) for iq, ik in fallback.pairs]
        big = [p for p, b in zip(fallback.pairs, is_big) if b]
        self.big = BucketedBlock(fallback.kernel, big) if big else None
        # the rest in query-row order, so that rows already packed in place are a view, not a gather
        pairs = sorted((p for p, b in zip(fallback.pairs, is_big) if not b), key=lambda p: _first(p[0]))
        self.small = bool(pairs)
        # in place (no gather or scatter) where the pairs allow it; the rows of dense segments are then rows
        # without a partner in the varlen launch, filled by the dense calls afterwards
        self.rows = getattr(fallback, "rows", None)
        whole = _in_place(pairs, self.rows, device, self.ops.even_spans)
        self.partnerless = _Partnerless(None, None)  # rows the block writes itself (in place only)
        self.spans: _Spans | None = None  # the shared segments alone, for pairs that take spans (in place only)
        self.launch_spans: dict[bool, _Spans] = {}  # per causal: the spans a launch takes (odd ones evened)
        if whole is not None:
            (self.q_index, self.cu_q, self.max_q), (self.k_index, self.cu_k, self.max_k), self.partnerless, \
                self.spans, self.launch_spans = whole
        else:
            self.q_index, self.cu_q, self.max_q = _index([p[0] for p in pairs], device)
            self.k_index, self.cu_k, self.max_k = _index([p[1] for p in pairs], device)

    def _check_rows(self, q: Tensor, k: Tensor) -> None:
        """The in-place launch addresses every row by its cu_seqlens: the tensors must have the block's rows."""
        if self.rows is not None and (q.shape[2], k.shape[2]) != self.rows:
            raise RuntimeError(f"packed block built for {self.rows} query/key rows got {q.shape[2]}/{k.shape[2]}")

    @property
    def lonely_q(self) -> Tensor | None:
        """Query rows with no keys as a bool mask over the block's query rows (in-place blocks only; None:
        none)."""
        rows = self.partnerless.q_rows
        if rows is None:
            return None
        mask = torch.zeros(self.rows[0], dtype=torch.bool, device=rows.device)
        mask[rows] = True
        return mask

    @property
    def name(self) -> str:
        """The dense kernel's name (the block's kernel when it falls back)."""
        return self.fallback.name

    def forward_unchecked(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                          scale: float) -> tuple[Tensor, Tensor, Any]:
        """out ``[1, h, sq, d]``, lse ``[1, h, sq]`` float32 (-inf on rows without keys), ctx."""
        # one document over every row runs the dense kernel as is, unless it is a dense (bucketed) document: then
        # it takes the same contiguous padded copy as every other bucketed document, because cuDNN, given strided
        # views of a shape it has also seen contiguous, returned wrong gradients (kernels/segmented.py, _take)
        if (self.full and self.big is None) or varlen_reason(q, k, self.ops) is not None:
            return self.fallback.forward_unchecked(q, k, v, causal=causal, scale=scale)
        self._check_rows(q, k)
        if self.big is not None:
            self.big.check(causal)
        sq = q.shape[2]
        aux = big_ctx = spans = None
        if self.small:  # first: in place, its output is the block's (the dense rows are rows without keys in it)
            qp, kp, vp = _packed(q, self.q_index), _packed(k, self.k_index), _packed(v, self.k_index)
            if self.spans is not None and self.ops.takes_spans(qp):
                spans = self.launch_spans[bool(causal)]
            o, lse, aux = self.ops.forward(qp, kp, vp, *self._segments(spans), causal, scale)
            lonely = self.partnerless
            # the pairs give them +inf (FlashAttention-2) or leave them unset (cuDNN); rows lent to odd spans hold
            # what the launch computed for them: every one is overwritten here
            if lonely.q_rows is not None:
                lse.index_fill_(1, lonely.q_rows, float("-inf"))  # lse is [h, tq]
                # a merged block's rows stay unset (the merge reads none whose lse is -inf); dense segments
                # (the own block only, never merged) write their rows below, over these
                if not self.merged or self.big is not None:
                    fill_rows_(o, lonely.q_rows, 0)
            out = _unpacked(o, self.q_index, sq)
            lse_full = _unpacked(lse.t().unsqueeze(-1), self.q_index, sq, float("-inf"))[..., 0]
            if self.big is not None:
                big_ctx = self.big.forward_into(q, k, v, out, lse_full, scale=scale)
        else:
            out, lse_full, big_ctx = self.big.forward_unchecked(q, k, v, causal=causal, scale=scale)
        return out, lse_full.float().contiguous(), ("varlen", aux, big_ctx, spans)

    def _segments(self, spans: _Spans | None) -> tuple[Tensor, Tensor, int, int]:
        """(q side, k side, longest query segment, longest key segment) of the varlen launch: every row's segment
        as ``cu_seqlens``, or ``spans`` (the shared segments alone; the rows without a partner are the block's
        to write either way)."""
        if spans is not None:
            return spans.q, spans.k, spans.max_q, spans.max_k
        return self.cu_q, self.cu_k, self.max_q, self.max_k

    def backward_unchecked(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           ctx: Any, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """dq, dk, dv of this block from the merged ``out``/``lse`` (zero where no segment is shared)."""
        if not (isinstance(ctx, tuple) and len(ctx) == 4 and ctx[0] == "varlen"):
            return self.fallback.backward_unchecked(dout, q, k, v, out, lse, ctx, causal=causal, scale=scale)
        self._check_rows(q, k)
        if self.big is not None:
            self.big.check(causal)
        if not self.small:
            return self.big.backward_unchecked(dout, q, k, v, out, lse, ctx[2], causal=causal, scale=scale)
        qp, kp, vp = _packed(q, self.q_index), _packed(k, self.k_index), _packed(v, self.k_index)
        dp = _packed(dout, self.q_index).to(q.dtype).contiguous()
        op_ = _packed(out, self.q_index).to(q.dtype).contiguous()
        lp = _packed(lse.unsqueeze(-1), self.q_index)[..., 0].t().float().contiguous()  # [h, tq]
        spans = ctx[3]
        if spans is not None and spans.borrowed is not None:  # lent rows: weights exp(s - inf) = 0 (a new tensor)
            lp = lp.index_fill(1, spans.borrowed, float("inf"))
        dq, dk, dv = self.ops.backward(dp, qp, kp, vp, op_, lp, *self._segments(ctx[3]), causal, scale, ctx[1])
        lonely = self.partnerless
        if lonely.q_rows is not None:
            fill_rows_(dq, lonely.q_rows, 0)
        if lonely.k_rows is not None:
            fill_rows_(dk, lonely.k_rows, 0)
            fill_rows_(dv, lonely.k_rows, 0)
        grads = [_unpacked(dq, self.q_index, q.shape[2]), _unpacked(dk, self.k_index, k.shape[2]),
                 _unpacked(dv, self.k_index, v.shape[2])]
        if self.big is not None:  # its rows are disjoint from the varlen segments' (zero there)
            grads = self.big.backward_into(dout, q, k, v, out, lse, ctx[2], grads, scale=scale)
        return grads[0], grads[1], grads[2]
