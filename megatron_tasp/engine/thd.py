"""Packed documents (THD) in the engine: a compiled call re-targeted at one set of document boundaries.

The partition (:mod:`megatron_tasp.thd`): rank r holds chunks r and 2·CP-1-r of every padded document. Let F
be the concatenation of chunk r of every document and B that of chunk 2·CP-1-r. The local tokens are permuted
once into ``[F ; B]`` (and back on the output and the gradients): that is exactly the dense zigzag layout, so
rings, pieces, exchange, schedule cases and merges are the dense ones. Within one document F's tokens precede
B's globally, and every chunk of a piece from an *earlier* source precedes both of this rank's chunks of the
same document (a *later* source's chunks precede only B's), so the dense cases stay right per document; only
the blocks change: every block is masked to "same segment" (causal in local order for the own block). Segment
ids: ``2i`` for document i's real tokens, ``2i + 1`` for its padding, which every block pairs with nothing
(queries ``-1``, keys ``-2``: no launch or per-row work for padding; its lse stays -inf through the merges); the
padded rows of the output are zeroed at the end, and so are their gradients, so no gradient reaches or leaves
a padded token (exactly 0, whatever finite values the incoming gradient holds there; cuDNN's pair may lend a
padded row to an odd span, whose weights of exactly 0 carry no finite value on). A received piece's segment ids
depend on its source rank, which the schedule knows: :func:`thd_layout` precomputes one segmented kernel
(:mod:`megatron_tasp.kernels.segmented`) per (step, lane, case) for each set of boundary values.

CP=2 with one chunk keeps the THD order instead (:func:`_natural_call`): a rank's one piece is its whole KV in
any order, so nothing needs ``[F ; B]``; every document's two chunks stay contiguous, the own block's varlen
launch reads them in place, and the remote block runs over all rows with its case (an earlier source's front
chunks; a later source seen by the back chunks only) written into the segment ids.

Cost. The boundaries are read to the host once per call (a host sync on GPU) and a new set is compiled
(and agreed across ranks with one all-reduce) once. On CUDA a block runs all its documents as one varlen
launch (:mod:`megatron_tasp.kernels.varlen`; with ``options.packed_dense_rows`` the large ones as dense kernel
calls); elsewhere the segmented kernels loop over the documents of a block with one dense kernel call each.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_tasp.engine.agree import agree_boundaries, boundaries_digest
from megatron_tasp.engine.backward import backward
from megatron_tasp.engine.cache import PLAN_CACHE
from megatron_tasp.engine.compiled import FULL, CompiledCall, LocalCall
from megatron_tasp.engine.errors import TaspConfigError
from megatron_tasp.engine.forward import forward
from megatron_tasp.kernels.bucketed import is_dense
from megatron_tasp.kernels.cudnn_varlen import (
    auto_varlen_ops,
    cudnn_available,
    cudnn_input_reason,
    strict_cudnn_varlen_ops,
)
from megatron_tasp.kernels.segmented import SegmentedBlock, segmented_block
from megatron_tasp.kernels.varlen import VarlenBlock, VarlenOps, flash_varlen_ops
from megatron_tasp.schedule import EARLIER, LATER
from megatron_tasp.thd import (
    check_padded,
    document_segments,
    engine_order,
    engine_segments,
    host_bounds,
    sequence_segments,
)

__all__ = ["ThdAttention", "ThdLayout", "thd_layout", "thd_views"]


@dataclass(frozen=True)
class ThdLayout:
    """A compiled call re-targeted at one set of document boundaries: the permutation between the THD local
    order and the engine's ``[F ; B]`` order (the dense zigzag layout; None where the call runs in the THD order
    itself), the padded rows, and the call whose kernels are segmented (same rings, pieces, exchange and
    schedule as the dense call)."""

    call: CompiledCall | LocalCall
    perm: torch.Tensor | None  # engine row -> THD local row (None: identity)
    inv: torch.Tensor | None  # THD local row -> engine row
    pad: torch.Tensor | None  # engine rows of padding tokens (None: no padding)


#: dense kernels whose packed-document blocks run as one varlen call on CUDA (fp16/bf16; cuDNN's ragged pair or
#: FlashAttention-2's, see _varlen_ops); any other kernel, or inputs no varlen pair takes, loop over the documents
VARLEN_KERNELS = frozenset({"cudnn", "flash", "efficient"})


def _block(kernel, seg_q: torch.Tensor, seg_k: torch.Tensor, device: torch.device,
           dense_rows: int | None, packed_kernel: str = "auto", merged: bool = False) -> SegmentedBlock | VarlenBlock:
    """The document-masked block of ``kernel``: one varlen launch (``packed_kernel``'s) where it can run (square
    segments of >= ``dense_rows`` rows on ``kernel`` itself, one bucket-padded call each: give it for the own
    block of a causal call only), else per document. ``merged``: a remote block, whose output the forward only
    merges (see :class:`VarlenBlock`)."""
    seg = segmented_block(kernel, seg_q, seg_k, device)
    ops = _varlen_ops(kernel, device, packed_kernel)
    if ops is None or not seg.pairs:  # no shared document: nothing to launch
        return seg
    # one document over every row: the dense kernel as is, unless it is a dense (bucketed) document, which takes
    # the bucketed block's contiguous copy like every other (see VarlenBlock.forward_unchecked)
    if seg.full and not is_dense(seg_q.numel(), seg_k.numel(), dense_rows):
        return seg
    return VarlenBlock(seg, device, big_rows=dense_rows, ops=ops, merged=merged)


def _own_dense_rows(call: CompiledCall | LocalCall) -> int | None:
    """``packed_dense_rows`` for the own block of ``call``: causal calls only (the bucket padding is exact under
    the causal mask alone); every other block keeps all its segments in the varlen launch."""
    return call.packed_dense_rows if call.causal else None


def _varlen_ops(kernel, device: torch.device, packed_kernel: str = "auto") -> VarlenOps | None:
    """The varlen ops the packed-document blocks of ``kernel`` launch on ``device`` (None: one dense call per
    document): ``packed_kernel`` (``TaspOptions.packed_kernel``) picks cuDNN's ragged pair, FlashAttention-2's,
    or per call the first of them that can serve ('auto'). The one place the engine picks them: tests replace
    this function to run the varlen blocks with a float64 reference on CPU."""
    if device.type != "cuda" or kernel.name not in VARLEN_KERNELS:
        return None
    if packed_kernel == "flash":
        return flash_varlen_ops()
    if packed_kernel == "cudnn":
        check_packed_kernel(packed_kernel, device)
        return strict_cudnn_varlen_ops()  # thd_layout checked the inputs: it never declines into the loop
    return auto_varlen_ops()


def check_packed_kernel(packed_kernel: str, device: torch.device, dtype: torch.dtype | None = None,
                        head_dim: int | None = None) -> None:
    """Raise when ``packed_kernel='cudnn'`` cannot serve ``device`` (or inputs of ``dtype``/``head_dim`` when
    given); CUDA only: packed blocks elsewhere run per document whatever it says. :func:`thd_layout` checks before
    the ranks agree on a new layout, so every rank reports it, including a rank whose own blocks would not
    have launched a varlen call."""
    if packed_kernel != "cudnn" or device.type != "cuda":
        return
    reason = cudnn_available(device)
    if reason is None and dtype is not None and head_dim is not None:
        reason = cudnn_input_reason(dtype, head_dim)
    if reason is not None:
        raise TaspConfigError(f"packed_kernel='cudnn': {reason}; use packed_kernel='auto' (FlashAttention-2 where "
                              "cuDNN cannot serve, one call per document where neither can) or 'flash'")


def _segmented_call(call: CompiledCall | LocalCall, segs: list[torch.Tensor], device: torch.device):
    """A shallow copy of ``call`` whose every block kernel is masked to equal segments (``segs[s]``: the
    segment ids of CP rank s in engine order); large segments per the call's ``packed_dense_rows``."""
    n, r = call.plan.world_size, call.plan.rank
    mine = segs[r]
    out = copy.copy(call)
    out.local_kernel = _block(call.kernel, _as_queries(mine), _as_keys(mine), device, _own_dense_rows(call),
                              call.packed_kernel)
    if n == 1:
        return out
    pieces = call.pieces
    perm = pieces.perm.cpu()
    offs: dict[tuple[int, int], int] = {}  # (lane, ring) -> first row of the sub-piece in the packed order
    at = 0
    for j in range(pieces.chunks):
        for i, length in enumerate(pieces.lengths(j)):
            offs[j, i] = at
            at += length
    blocks: list = [[]]
    for st in call.plan.steps[1:]:
        source = {h.ring: h.source for h in st.held}
        lanes = []
        for j in range(call.chunks):
            entries = []
            for case, rings, kern in call.blocks[st.step][j]:
                keys = torch.cat([segs[source[i]][perm[offs[j, i]:offs[j, i] + call.rows_of(j, case, i)]]
                                  for i in rings])
                block = _block(kern, _as_queries(mine[call.q_rows(case)]), _as_keys(keys), device, None,
                               call.packed_kernel, merged=True)
                # a block no query may see is left out (no kernel, no merge), except at step 1 where the
                # backward's dK/dV accumulator of every held piece starts from the block's (zero) gradient
                if block.pairs or st.step == 1:
                    entries.append((case, rings, block))
            lanes.append(entries)
        blocks.append(lanes)
    out.blocks = blocks
    return out


#: segment ids that match nothing: query rows (-1) and key rows (-2) a block's case leaves out
_NO_KEYS, _NO_QUERIES = -1, -2


def _as_queries(ids: torch.Tensor) -> torch.Tensor:
    """Segment ids of a block's query side: padding (odd ids) sees no key. A padded token takes no part in any
    block (no launch, no per-row work: as segments of their own, the padding of every document doubled the
    varlen launches' segments, which cost cuDNN's per-segment kernels up to half their time); the blocks give
    its rows lse -inf and output 0, the merge keeps them so (-inf with -inf is -inf), and its gradients are 0."""
    return torch.where(ids % 2 == 1, _NO_KEYS, ids)


def _as_keys(ids: torch.Tensor) -> torch.Tensor:
    """Segment ids of a block's key side: padding (odd ids) is seen by no query (see :func:`_as_queries`)."""
    return torch.where(ids % 2 == 1, _NO_QUERIES, ids)


def _natural_segments(cu_pad: Sequence[int], cu: Sequence[int], n: int,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids of CP rank ``rank``'s tokens in their own THD order (per document: its chunk ``rank``, then
    its chunk ``2n-1-rank``; ids as :func:`~megatron_tasp.thd.engine_segments` gives them), and which of them
    lie in the back chunk ``2n-1-rank``."""
    pad_len = torch.tensor(cu_pad[1:], dtype=torch.long) - torch.tensor(cu_pad[:-1], dtype=torch.long)
    real = torch.tensor(cu[1:], dtype=torch.long) - torch.tensor(cu[:-1], dtype=torch.long)
    chunk = pad_len // (2 * n)
    # per document four runs: the front chunk's real tokens and padding, then the back chunk's (built as runs,
    # not token by token: this runs on the host for every new set of boundaries)
    front = torch.minimum((real - rank * chunk).clamp(min=0), chunk)
    back = torch.minimum((real - (2 * n - 1 - rank) * chunk).clamp(min=0), chunk)
    doc = 2 * torch.arange(chunk.numel())
    ids = torch.stack((doc, doc + 1, doc, doc + 1), 1).reshape(-1)
    lengths = torch.stack((front, chunk - front, back, chunk - back), 1).reshape(-1)
    in_back = torch.tensor([False, True]).repeat(chunk.numel())
    return (torch.repeat_interleave(ids, lengths),
            torch.repeat_interleave(in_back, torch.stack((chunk, chunk), 1).reshape(-1)))


def natural_order_applies(call: CompiledCall | LocalCall) -> bool:
    """True when a packed-document call runs in the THD local order itself (no permutation to ``[F ; B]``):
    CP=2 with one chunk, where the one piece of a rank is its whole KV in that order."""
    return (isinstance(call, CompiledCall) and call.plan.world_size == 2 and call.chunks == 1
            and call.pieces.identity)


def _natural_call(call: CompiledCall, segs: list[torch.Tensor], backs: list[torch.Tensor], device: torch.device):
    """CP=2 packed documents in the THD local order: every document's rows are contiguous on both ranks, so the
    own block's varlen launch reads its rows in place (no gather, and no permutation into ``[F ; B]`` and back).
    The remote block runs over all query rows and all rows of the peer's piece (``full_rows``); its case is
    expressed in the document masks instead: an earlier peer's back-chunk keys, or this rank's front-chunk
    queries for a later peer, carry ids that match nothing (no launch or FLOPs for them; their output rows get
    lse -inf, which the merge weighs 0, and zero gradients)."""
    r = call.plan.rank
    mine = segs[r]
    out = copy.copy(call)
    out.full_rows = True
    # the own block on a second stream, beside the remote one: one block's per-row kernels (dO.O, the dQ
    # conversion, the GQA head sums) and tails overlap the other's attention kernel (on one H200, a rank's
    # fwd+bwd against the whole sequence on one GPU went from 0.570 to 0.552 at 32K tokens and from 0.57 to 0.559
    # at 64K: scripts/gpu_thd_rank_probe.py, docs/benchmarks/2026-12-02-h200-thd-cp2-own-stream.json)
    out.local_stream = PLAN_CACHE.streams.get(device, "own block") if device.type == "cuda" else None
    out.unmerged_rows = None  # the remote block's output covers every row (masked ones with lse -inf)
    out.local_kernel = _block(call.kernel, _as_queries(mine), _as_keys(mine), device, _own_dense_rows(call),
                              call.packed_kernel)
    blocks: list = [[]]
    for st in call.plan.steps[1:]:
        source = {h.ring: h.source for h in st.held}
        entries = []
        for case, rings, kern in call.blocks[st.step][0]:
            if case not in (EARLIER, LATER, FULL):
                raise AssertionError(f"unknown block case {case!r}")
            keys = _as_keys(torch.cat([torch.where(backs[source[i]], _NO_QUERIES, segs[source[i]])
                                       if case == EARLIER else segs[source[i]] for i in rings]))
            queries = _as_queries(torch.where(backs[r], mine, _NO_KEYS) if case == LATER else mine)
            block = _block(kern, queries, keys, device, None, call.packed_kernel, merged=True)
            if block.pairs or st.step == 1:  # step 1 also starts every held piece's dK/dV accumulator
                entries.append((case, rings, block))
        blocks.append([entries])
    # unmerged_rows is None: the forward relies on a step-1 block (over every query row, full_rows) to write
    # every output row
    if len(blocks) < 2 or not blocks[1][0]:
        raise AssertionError("the CP=2 THD-order layout needs a step-1 block over every query row")
    out.blocks = blocks
    return out


def _check_boundaries(cu_pad: tuple[int, ...], cu: tuple[int, ...], n: int, length: int) -> None:
    try:
        check_padded(cu_pad, n)
    except ValueError as exc:
        raise TaspConfigError(f"{exc}; documents of any length over the sequence split as a whole take "
                              "options.packed_split='sequence'") from None
    if len(cu) != len(cu_pad) or cu[0] != 0:
        raise TaspConfigError(f"cu_seqlens must start at 0 and have as many entries as cu_seqlens_padded "
                              f"({len(cu_pad)}), got {len(cu)}")
    for i in range(len(cu) - 1):
        if not 0 <= cu[i + 1] - cu[i] <= cu_pad[i + 1] - cu_pad[i]:
            raise TaspConfigError(f"document {i}: length {cu[i + 1] - cu[i]} (cu_seqlens) must lie in "
                                  f"[0, {cu_pad[i + 1] - cu_pad[i]}] (its padded length, cu_seqlens_padded)")
    if cu_pad[-1] != length * n:
        raise TaspConfigError(f"cu_seqlens_padded ends at {cu_pad[-1]} tokens but CP={n} ranks of {length} local "
                              f"tokens hold {length * n}; pass the global padded boundaries and the local tokens")


def _check_sequence(cu: tuple[int, ...], n: int, length: int) -> None:
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise TaspConfigError(f"cu_seqlens must start at 0 and never decrease, got {list(cu)[:8]}")
    if cu[-1] != length * n:
        raise TaspConfigError(f"cu_seqlens ends at {cu[-1]} tokens but CP={n} ranks of {length} local tokens hold "
                              f"{length * n} (packed_split='sequence': the documents cover the whole sequence)")
    if length % 2:
        raise TaspConfigError(f"packed_split='sequence' needs an even number of local tokens (two chunks of the "
                              f"sequence per rank), got {length}")


def thd_layout(call: CompiledCall | LocalCall, cu_seqlens_padded: torch.Tensor | Sequence[int] | None,
               cu_seqlens: torch.Tensor | Sequence[int] | None, length: int, device: torch.device,
               split: str = "document", *, dtype: torch.dtype | None = None,
               head_dim: int | None = None) -> ThdLayout:
    """The layout of ``call`` for these document boundaries, built once per (call, boundary values, split).
    ``dtype``/``head_dim``: the inputs' (the call is compiled per both), so an explicit
    ``packed_kernel='cudnn'`` that cannot take them fails on every rank before any exchange.
    The call is compiled per options value, so calls whose options differ (``packed_dense_rows`` among them,
    which shapes the blocks) never share a layout.

    ``split='document'``: every document padded to 2·CP chunks (``cu_seqlens_padded``; ``cu_seqlens`` the
    real lengths). ``split='sequence'``: the sequence as a whole in 2·CP chunks (the dense zigzag layout),
    documents of any length (``cu_seqlens`` only). The boundaries are read to the host on every call (on GPU
    a host sync; the compiled layout is keyed on the values, so calls with the same shapes but other
    documents never reuse a stale layout). A new set of boundaries is checked across the CP ranks with one
    all-reduce (every rank raises on a mismatch)."""
    if split == "sequence":
        if cu_seqlens is None:
            raise TaspConfigError("packed_split='sequence' needs cu_seqlens (the documents' boundaries)")
        cu = tuple(host_bounds(cu_seqlens))
        cu_pad = cu
        if cu_seqlens_padded is not None and tuple(host_bounds(cu_seqlens_padded)) != cu:
            raise TaspConfigError("packed_split='sequence' splits the sequence as a whole and takes no per-document "
                                  "padding: give cu_seqlens only (cu_seqlens_padded None or equal to it)")
    elif (isinstance(cu_seqlens_padded, torch.Tensor) and isinstance(cu_seqlens, torch.Tensor)
            and cu_seqlens.device == cu_seqlens_padded.device and cu_seqlens.dim() == cu_seqlens_padded.dim() == 1):
        both = torch.cat((cu_seqlens_padded.long(), cu_seqlens.long())).tolist()  # one host read, not two
        cu_pad, cu = tuple(both[:cu_seqlens_padded.numel()]), tuple(both[cu_seqlens_padded.numel():])
    else:
        if cu_seqlens_padded is None:
            cu_seqlens_padded = cu_seqlens
        cu_pad = tuple(host_bounds(cu_seqlens_padded))
        cu = cu_pad if cu_seqlens is None else tuple(host_bounds(cu_seqlens))
    key = (call, cu_pad, cu, split)
    cache = (PLAN_CACHE.scope(call.group) if isinstance(call, CompiledCall) else PLAN_CACHE.local).layouts()
    layout = cache.get(key)
    if layout is not None:
        return layout
    n = call.plan.world_size
    problem = None
    try:
        check_packed_kernel(call.packed_kernel, device, dtype, head_dim)
        if split == "sequence":
            _check_sequence(cu, n, length)
        else:
            _check_boundaries(cu_pad, cu, n, length)
    except TaspConfigError as exc:
        problem = exc
    if n > 1:
        agree_boundaries(call.group, boundaries_digest(cu_pad, cu, (split,)), device, problem)
    elif problem is not None:
        raise problem
    if split == "sequence":
        segs = [sequence_segments(cu, n, s) for s in range(n)]
        layout = ThdLayout(call=_segmented_call(call, segs, device), perm=None, inv=None, pad=None)
        return cache.put(key, layout)
    order: torch.Tensor | None = None  # engine row -> THD local row (None: the THD order itself)
    if n == 1:  # one rank: no pieces to exchange, so no [F ; B] order either; documents stay contiguous
        segs = [document_segments(cu_pad, cu)]
        seg_call = _segmented_call(call, segs, device)
    elif natural_order_applies(call):
        nat = [_natural_segments(cu_pad, cu, n, s) for s in range(n)]
        segs = [x[0] for x in nat]
        seg_call = _natural_call(call, segs, [x[1] for x in nat], device)
    else:
        segs = [engine_segments(cu_pad, cu, n, s) for s in range(n)]
        order = engine_order(cu_pad, n)
        seg_call = _segmented_call(call, segs, device)
    identity = order is None or bool(torch.equal(order, torch.arange(length)))
    pad = torch.nonzero(segs[call.plan.rank] % 2 == 1).flatten()
    layout = ThdLayout(call=seg_call,
                       perm=None if identity else order.to(device),
                       inv=None if identity else torch.argsort(order).to(device),
                       pad=pad.to(device) if pad.numel() else None)
    return cache.put(key, layout)


def thd_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[t, h, d]`` or ``[t, 1, h, d]`` tensors as ``[t, 1, h, d]`` views (the engine's sbhd with b = 1)."""
    out = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or not (x.dim() == 3 or (x.dim() == 4 and x.shape[1] == 1)):
            raise TaspConfigError(f"packed documents (cu_seqlens given): {name} must be [t, heads, head_dim] "
                                  f"or [t, 1, heads, head_dim], got {tuple(getattr(x, 'shape', ()))}")
        out.append(x.unsqueeze(1) if x.dim() == 3 else x)
    return tuple(out)


def _to_engine(x: torch.Tensor, layout: ThdLayout) -> torch.Tensor:
    """THD local order -> engine order ([t, 1, h, d]); a new tensor unless the order is the identity."""
    x = x.unsqueeze(1) if x.dim() == 3 else x
    return x if layout.perm is None else x.index_select(0, layout.perm)


def _from_engine(x: torch.Tensor, layout: ThdLayout, shape: torch.Size) -> torch.Tensor:
    return (x if layout.inv is None else x.index_select(0, layout.inv)).reshape(shape)


class ThdAttention(torch.autograd.Function):
    """Packed-document attention: permute to the engine's order (unless the layout keeps the THD order), run
    the segmented call, zero the padded rows (of the output, and of dQ/dK/dV: no gradient reaches or leaves a
    padded token), permute back."""

    @staticmethod
    def forward(ctx, q, k, v, layout: ThdLayout):  # type: ignore[override]
        qe, ke, ve = (_to_engine(x, layout) for x in (q, k, v))
        out, lse, kctx, kept = forward(layout.call, qe, ke, ve)
        if layout.pad is not None:
            out.index_fill_(0, layout.pad, 0)
        ctx.save_for_backward(qe, ke, ve, out, lse)
        ctx.layout, ctx.kctx, ctx.kept = layout, kctx, kept
        ctx.shapes = (q.shape, k.shape, v.shape)
        return _from_engine(out, layout, q.shape)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        qe, ke, ve, out, lse = ctx.saved_tensors
        layout = ctx.layout
        kept, ctx.kept = ctx.kept, None  # see _TaspAttention.backward (a second backward re-exchanges KV)
        with torch.no_grad():
            # the incoming gradient is read as is (no copy of dout to zero its padded rows): no block pairs
            # padding with anything and every kernel tiles each segment pair on its own, so what the padded rows
            # carry reaches at most their own gradients, which are zeroed here (a non-finite value included)
            dq, dk, dv = backward(layout.call, _to_engine(dout, layout).contiguous(), qe, ke, ve, out, lse,
                                  ctx.kctx, kept)
            if layout.pad is not None:
                for g in (dq, dk, dv):
                    g.index_fill_(0, layout.pad, 0)
        return (*(_from_engine(g, layout, s) for g, s in zip((dq, dk, dv), ctx.shapes)), None)
