"""Packed-document blocks on cuDNN's fused attention over ragged (THD) tensors: a :class:`VarlenOps` pair.

cuDNN runs variable-length attention natively on Hopper when every tensor is described as ``[b, h, s, d]``
with a *ragged offset* per segment (where its first row starts in the packed ``[total, h, d]`` tensor) and a
padding mask (each segment's real length). torch's own cuDNN SDPA does not expose that (its ``cum_seq_q/k``
path was measured here returning wrong gradients), so this module builds the graphs through NVIDIA's cuDNN
frontend Python package (``pip install nvidia-cudnn-frontend``; optional, imported lazily, never needed to
import or test megatron-tasp). It uses the cuDNN library torch already loaded.

Shapes and plans. A cuDNN graph is built per (direction, segment count, longest query / key segment, heads,
head dim, dtype, causal, scale; the backward also per total rows, which size its dQ accumulator); building one
takes ~0.15 s. The segment count, the longest segments and the backward's totals (beyond 32K rows: to multiples
of 32K) are rounded up to powers of two
(the extra segments are empty; lengths at least 64), so packings whose document lengths change every call reuse
a handful of graphs, and at most 256 are kept (least recently used dropped). The rounding costs no measurable
time: on the H200, a CP=2 rank's blocks took the same time (within 3%) with exact shapes, with these, and with 4x
the segments or 4x the longest segments. The softmax statistics are ragged as well (``[total, h]``), so no
``[b, h, s_max]`` buffer sized by the longest segment is ever allocated. Host time: one execute through the
frontend's Python layer took 0.26-0.34 ms on the H200 machine's host; a block's segment columns are built once
and kept (:meth:`_CudnnRagged._columns`).

Contract (:class:`~megatron_tasp.kernels.varlen.VarlenOps`): a segment may be empty on one side; the kernel
computes nothing for it and leaves its rows as they were (measured for the forward's output and statistics), and
the block writes 0 / -inf there itself, so the outputs here are allocated, not zero-filled. The pair takes spans
(segments need not be back to back), so in-place blocks leave out the rows without a partner altogether: on the
H200 that took a CP=2 remote block's fwd+bwd from 3.59 to 3.14 ms at 32K (rank 0, where half the query rows
have no keys): the backward's main kernel and its per-row kernels (dO.O, dQ conversion, GQA head sums) skip
those rows (a zero fill of a
query-sized tensor is ~40 us per launch at 16K rows on the H200). Its backward's dot(dO, O) kernel ran 1.47x as
long when query segments had odd row counts (a CP=2 rank's own block at 32K on the H200: 260 vs 177 us, with or
without gaps between spans; the main kernels unchanged), so the pair asks for even spans
(:attr:`~megatron_tasp.kernels.varlen.VarlenOps.even_spans`). The forward's lse is ``[h, total_q]`` float32;
the backward takes the merged out and lse of the engine.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .varlen import VarlenOps, flash_varlen_ops, spans_of

__all__ = ["CUDNN_FRONTEND_HINT", "CudnnVarlenError", "auto_varlen_ops", "cudnn_available", "cudnn_frontend",
           "cudnn_input_reason", "cudnn_varlen_ops", "cudnn_varlen_reason", "graph_key", "strict_cudnn_varlen_ops"]

logger = logging.getLogger("megatron_tasp")


class CudnnVarlenError(ValueError):
    """An explicit ``packed_kernel='cudnn'`` met a call cuDNN's ragged attention cannot serve."""


CUDNN_FRONTEND_HINT = "pip install nvidia-cudnn-frontend"
_MIN_BACKEND = 90600  # int64 ragged offsets and ragged softmax statistics
_DTYPES = (torch.float16, torch.bfloat16)
_MIN_ROWS = 64  # smallest bucket of the longest segment
_MAX_GRAPHS = 256  # built graphs kept per process (least recently used dropped first)
_BIG_ROWS = 32768  # beyond this, backward capacities grow in steps of this many rows
_MAX_COLUMNS = 16  # segment columns kept per pair of boundary tensors


@functools.lru_cache(maxsize=1)
def cudnn_frontend() -> Any | None:
    """The ``cudnn`` frontend module, or None when it is not installed (or cannot load the cuDNN library);
    looked up once per process."""
    try:
        return importlib.import_module("cudnn")
    except Exception:  # ImportError, or the package failing to find libcudnn (RuntimeError)
        return None


def _pow2(x: int, low: int = 1) -> int:
    """The smallest power of two >= max(x, low)."""
    x = max(int(x), low)
    return 1 << (x - 1).bit_length()


def _capacity(rows: int) -> int:
    """The backward's token capacity for ``rows`` rows (it sizes cuDNN's fp32 dQ accumulator): a power of two up
    to 32768, then a multiple of 32768, so the accumulator stays within 2x (beyond 32K rows, 1.5x) of need."""
    return _pow2(rows, _MIN_ROWS) if rows <= _BIG_ROWS else -(-rows // _BIG_ROWS) * _BIG_ROWS


def graph_key(segments: int, max_q: int, max_k: int) -> tuple[int, int, int]:
    """(segment count, longest query segment, longest key segment) as graphs are built for them: each rounded
    up to a power of two (the segment lengths to at least 64 rows), so the number of graphs stays small when
    the document lengths change every call."""
    return _pow2(segments), _pow2(max_q, _MIN_ROWS), _pow2(max_k, _MIN_ROWS)


def cudnn_available(device: torch.device) -> str | None:
    """None when cuDNN's ragged pair can run on ``device`` at all (the frontend installed, cuDNN >= 9.6, a
    Hopper or newer GPU), else why not."""
    if device.type != "cuda":
        return "needs CUDA"
    cudnn = cudnn_frontend()
    if cudnn is None:
        return f"the cuDNN frontend is not installed ({CUDNN_FRONTEND_HINT})"
    try:
        if cudnn.backend_version() < _MIN_BACKEND:
            return f"cuDNN {cudnn.backend_version_string()} (ragged attention here needs >= 9.6)"
        if torch.cuda.get_device_capability(device) < (9, 0):
            return "cuDNN's ragged attention needs a Hopper or newer GPU (compute capability >= 9.0)"
    except Exception as exc:  # a broken install answers with a reason, never an exception mid-agreement
        return f"the cuDNN frontend failed to answer ({type(exc).__name__}: {exc})"
    return None


def cudnn_input_reason(dtype: torch.dtype, head_dim: int) -> str | None:
    """None when cuDNN's ragged pair takes inputs of ``dtype`` and ``head_dim``, else why not."""
    if dtype not in _DTYPES:
        return f"dtype {dtype} (cuDNN ragged attention takes fp16/bf16)"
    if head_dim % 8 or head_dim > 128:
        return f"head dim {head_dim} (this pair takes multiples of 8 up to 128)"
    return None


def cudnn_varlen_reason(q: Tensor) -> str | None:
    """None when the cuDNN ragged pair can take a block whose query tensor is ``q`` (``[b, h, s, d]``), else why
    not."""
    if q.device.type == "cuda":
        reason = cudnn_input_reason(q.dtype, q.shape[-1])
        if reason is not None:
            return reason
    return cudnn_available(q.device)


def _segment_count(bounds: Tensor) -> int:
    """Segments of ``cu_seqlens`` ``[n + 1]`` or of spans ``[n, 2]``."""
    return bounds.shape[0] if bounds.dim() == 2 else bounds.numel() - 1


def _capturing(t: Tensor) -> bool:
    """True while the current stream of ``t``'s (CUDA) device is being captured into a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass
class _Graph:
    graph: Any
    tensors: dict[str, Any]  # name -> the graph's tensor handle
    workspace: int


def _dense(graph: Any, name: str, b: int, h: int, s: int, d: int, dtype: Any, row: int | None = None) -> Any:
    """A packed ``[total, h, d]`` tensor described as ``[b, h, s, d]`` (token-major strides; ``row``: elements
    from one row to the next, default ``h * d``)."""
    row = h * d if row is None else row
    return graph.tensor(name=name, dim=[b, h, s, d], stride=[s * row, d, row, 1], data_type=dtype)


def _kv_row_stride(k: Tensor, v: Tensor) -> int | None:
    """The row stride (elements) at which the graphs read ``k`` and ``v`` (``[rows, h_kv, d]``) in place, or None
    when they must be copied first: contiguous rows, or K and V as the two halves of one ``[rows, 2, h_kv, d]``
    buffer (how the engine receives a peer's K/V), whose gradients are then written in that layout too."""
    rows, h, d = k.shape
    if rows == 0 or k.stride(-1) != 1 or (h > 1 and k.stride(-2) != d) or k.stride() != v.stride():
        return None
    row = k.stride(0) if rows > 1 else h * d
    if row == h * d and k.is_contiguous() and v.is_contiguous():
        return row
    if row == 2 * h * d and v.data_ptr() - k.data_ptr() == h * d * k.element_size():
        return row
    return None


def _column(graph: Any, name: str, n: int, dtype: Any) -> Any:
    return graph.tensor(name=name, dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dtype)


def _finish(graph: Any, cudnn: Any) -> None:
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()


class _CudnnRagged:
    """The built graphs of this process (per device, shape key, direction) and one cuDNN handle per device:
    the state cuDNN itself would keep in its plan cache, bounded by :func:`graph_key`'s rounding."""

    def __init__(self) -> None:
        self.graphs: dict[tuple, _Graph] = {}
        self.handles: dict[int, Any] = {}
        self.columns: WeakIdKeyDictionary = WeakIdKeyDictionary()  # cu_q -> cu_k -> key -> (versions, columns)

    def _handle(self, cudnn: Any, device: torch.device) -> tuple[Any, int]:
        """The device's handle, set to the current stream, and that stream's handle."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.handles:
            with torch.cuda.device(index):
                self.handles[index] = cudnn.create_handle()
        handle = self.handles[index]
        stream = torch.cuda.current_stream(device).cuda_stream
        cudnn.set_stream(handle=handle, stream=stream)
        return handle, stream

    def _build(self, cudnn: Any, handle: Any, backward: bool, key: tuple) -> _Graph:
        b, sq, sk, hq, hkv, d, rk, tq, tk, dtype, causal, scale = key
        io = cudnn.data_type.HALF if dtype == torch.float16 else cudnn.data_type.BFLOAT16
        f32, i32, i64 = cudnn.data_type.FLOAT, cudnn.data_type.INT32, cudnn.data_type.INT64
        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        t: dict[str, Any] = {
            "q": _dense(g, "q", b, hq, sq, d, io), "k": _dense(g, "k", b, hkv, sk, d, io, rk),
            "v": _dense(g, "v", b, hkv, sk, d, io, rk),
            "len_q": _column(g, "len_q", b, i32), "len_k": _column(g, "len_k", b, i32),
            "off_q": _column(g, "off_q", b + 1, i64), "off_k": _column(g, "off_k", b + 1, i64),
            "off_stats": _column(g, "off_stats", b + 1, i64),
        }
        t["q"].set_ragged_offset(t["off_q"])
        t["k"].set_ragged_offset(t["off_k"])
        t["v"].set_ragged_offset(t["off_k"])
        mask: dict[str, Any] = {"use_padding_mask": True, "seq_len_q": t["len_q"], "seq_len_kv": t["len_k"]}
        # causal segments are the own block's: square, or one query row longer where a span was lent a row at
        # its end (VarlenOps.even_spans), which top-left alignment keeps off the real rows' diagonal
        if causal:
            mask.update(diagonal_band_right_bound=0, diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT)
        if not backward:
            o, stats = g.sdpa(name="fwd", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, attn_scale=scale,
                              **mask)
            o.set_output(True).set_dim([b, hq, sq, d]).set_stride([sq * hq * d, d, hq * d, 1])
            o.set_ragged_offset(t["off_q"])
            stats.set_output(True).set_data_type(f32).set_dim([b, hq, sq, 1]).set_stride([sq * hq, 1, hq, 1])
            stats.set_ragged_offset(t["off_stats"])
            t["o"], t["stats"] = o, stats
        else:
            t["o"], t["do"] = _dense(g, "o", b, hq, sq, d, io), _dense(g, "do", b, hq, sq, d, io)
            t["stats"] = g.tensor(name="stats", dim=[b, hq, sq, 1], stride=[sq * hq, 1, hq, 1], data_type=f32)
            for name in ("o", "do"):
                t[name].set_ragged_offset(t["off_q"])
            t["stats"].set_ragged_offset(t["off_stats"])
            dq, dk, dv = g.sdpa_backward(name="bwd", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"],
                                         stats=t["stats"], attn_scale=scale, max_total_seq_len_q=tq,
                                         max_total_seq_len_kv=tk, **mask)
            for name, x, h, s, row, off in (("dq", dq, hq, sq, hq * d, "off_q"), ("dk", dk, hkv, sk, rk, "off_k"),
                                            ("dv", dv, hkv, sk, rk, "off_k")):
                x.set_output(True).set_dim([b, h, s, d]).set_stride([s * row, d, row, 1])
                x.set_ragged_offset(t[off])
                t[name] = x
        _finish(g, cudnn)
        return _Graph(g, t, g.get_workspace_size())

    def _graph(self, cudnn: Any, q: Tensor, k: Tensor, row_k: int, cu_q: Tensor, max_q: int, max_k: int,
               causal: bool, scale: float, backward: bool) -> tuple[_Graph, tuple[Any, int], tuple]:
        b, sq, sk = graph_key(_segment_count(cu_q), max_q, max_k)
        # the backward's dQ accumulator is sized by the total rows: an upper bound, rounded like the rest (the
        # forward does not depend on them); blocks that gather rows have totals that change with the documents.
        # With spans it must still cover every row: cuDNN indexes it by the ragged offsets (measured on the H200:
        # sized by the listed rows alone, spans past them got wrong gradients)
        tq, tk = (_capacity(q.shape[0]), _capacity(k.shape[0])) if backward else (0, 0)
        key = (b, sq, sk, q.shape[1], k.shape[1], q.shape[2], row_k, tq, tk, q.dtype, causal, float(scale))
        handle = self._handle(cudnn, q.device)
        full = (q.device.index, backward, key)
        graph = self.graphs.pop(full, None)
        if graph is None:
            graph = self._build(cudnn, handle[0], backward, key)
            logger.debug("cuDNN ragged attention: built the %s graph for %s", "backward" if backward else "forward",
                         key[:9])
            while len(self.graphs) >= _MAX_GRAPHS:  # least recently used first
                self.graphs.pop(next(iter(self.graphs)))
        self.graphs[full] = graph  # (re)inserted last: the dict's order is the order of use
        return graph, handle, key

    def _columns(self, cu_q: Tensor, cu_k: Tensor, b: int, hq: int, row_q: int, row_k: int,
                 stream: int) -> dict[str, Tensor]:
        """:meth:`_build_columns`, kept per pair of boundary tensors: a block builds its ``cu_q``/``cu_k`` once and
        launches with them on every call, and building the columns is about ten small kernels and 0.1-0.2 ms of
        host time, which a packed forward (host-bound at 32K tokens per rank) pays as GPU idle time. Entries go
        with the tensors (weak keys); an in-place change of either tensor (its version counter) or another
        stream (``stream``: the launch stream's handle, so a launch never reads columns still being written on
        another stream) builds them again. While a stream is being captured into a CUDA graph nothing is kept or
        served: columns recorded in a capture are not yet written, and the graph must own what it reads.
        ``cu_q``/``cu_k`` must change, if ever, only through in-place ops that move the version counter (not
        through ``.data`` or a raw pointer); the blocks never change theirs."""
        if _capturing(cu_q):
            return self._build_columns(cu_q, cu_k, b, hq, row_q, row_k)
        try:
            versions = (cu_q._version, cu_k._version)
        except RuntimeError:  # inference tensors track no version: build every time
            return self._build_columns(cu_q, cu_k, b, hq, row_q, row_k)
        per_k = self.columns.get(cu_q)
        if per_k is None:
            per_k = self.columns[cu_q] = WeakIdKeyDictionary()
        per = per_k.get(cu_k)
        if per is None:
            per = per_k[cu_k] = {}
        key = (b, hq, row_q, row_k, stream)
        hit = per.get(key)
        if hit is None or hit[0] != versions:
            if len(per) >= _MAX_COLUMNS:  # a handful of head counts and graph sizes per block
                per.clear()
            hit = per[key] = (versions, self._build_columns(cu_q, cu_k, b, hq, row_q, row_k))
        return hit[1]

    @staticmethod
    def _build_columns(cu_q: Tensor, cu_k: Tensor, b: int, hq: int, row_q: int, row_k: int) -> dict[str, Tensor]:
        """Lengths and ragged offsets of ``b`` segments (the real ones, then empty ones), on the device: rows
        times ``row_q`` / ``row_k`` elements (q, o, dq; k, v, dk, dv), and times ``hq`` for the statistics.
        ``cu_q``/``cu_k``: ``cu_seqlens`` or spans (:func:`~megatron_tasp.kernels.varlen.spans_of`); the empty
        segments, and the offset past the last, sit at the end of the last segment."""
        cols = {}
        for side, bounds, row in (("q", cu_q, row_q), ("k", cu_k, row_k)):
            first, length = spans_of(bounds)
            n = length.numel()
            end = first[-1:] + length[-1:] if n else torch.zeros(1, dtype=torch.long, device=bounds.device)
            first = torch.cat((first, end.expand(b + 1 - n)))
            length = torch.cat((length, torch.zeros(b - n, dtype=torch.long, device=bounds.device)))
            cols["len_" + side] = length.int().view(b, 1, 1, 1)
            cols["off_" + side] = (first * row).view(b + 1, 1, 1, 1)
            if side == "q":
                cols["off_stats"] = (first * hq).view(b + 1, 1, 1, 1)
        return cols

    def _run(self, graph: _Graph, handle: Any, values: dict[str, Tensor], device: torch.device) -> None:
        with torch.cuda.device(device):  # the launch goes to the tensors' device whatever device is current
            workspace = torch.empty(max(graph.workspace, 1), dtype=torch.uint8, device=device)
            graph.graph.execute({graph.tensors[name]: x for name, x in values.items()}, workspace, handle=handle)

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                 causal: bool, scale: float, backward: bool) -> tuple[tuple[Tensor, ...], int, _Graph, Any, dict]:
        """(contiguous q; k, v as the graphs read them), the k/v row stride, the direction's graph, the handle on
        the current stream, the segment columns. A peer's K/V arrive as halves of one buffer: read in place,
        not copied (two K-sized copies per launch otherwise)."""
        q = q.contiguous()
        row_k = _kv_row_stride(k, v)
        if row_k is None:
            k, v = k.contiguous(), v.contiguous()
            row_k = k.shape[1] * k.shape[2]
        graph, (handle, stream), key = self._graph(cudnn_frontend(), q, k, row_k, cu_q, max_q, max_k, causal,
                                                   scale, backward)
        cols = self._columns(cu_q, cu_k, key[0], q.shape[1], q.shape[1] * q.shape[2], row_k, stream)
        return (q, k, v), row_k, graph, handle, cols

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        (q, k, v), _, graph, handle, cols = self._prepare(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, False)
        # the kernel leaves the rows of queries without keys untouched (output and statistics, measured on H200):
        # the block writes 0 and -inf there (VarlenBlock); every other row belongs to a segment the kernel writes
        out = torch.empty_like(q)
        stats = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)  # [total, h]
        self._run(graph, handle, {"q": q, "k": k, "v": v, "o": out, "stats": stats, **cols}, q.device)
        return out, stats.t().contiguous(), None

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                 cu_k: Tensor, max_q: int, max_k: int, causal: bool, scale: float,
                 aux: Any) -> tuple[Tensor, Tensor, Tensor]:
        (q, k, v), row_k, graph, handle, cols = self._prepare(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                              True)
        # the kernel was measured writing 0 to the rows of a side without partners; the block zeroes them anyway,
        # so a cuDNN release that skips such segments cannot leave garbage there
        dq = torch.empty_like(q)
        if row_k == k.shape[1] * k.shape[2]:  # contiguous K/V (as _prepare left them): contiguous gradients
            dk, dv = torch.empty_like(k), torch.empty_like(v)
        else:  # written in K/V's layout (halves of one [rows, 2, h_kv, d] buffer), as the graph declares
            pair = torch.empty((k.shape[0], 2, *k.shape[1:]), dtype=k.dtype, device=k.device)
            dk, dv = pair[:, 0], pair[:, 1]
        stats = lse.t().contiguous()  # [total, h]
        self._run(graph, handle, {"q": q, "k": k, "v": v, "o": out.contiguous(), "do": dout.contiguous(),
                                  "stats": stats, "dq": dq, "dk": dk, "dv": dv, **cols}, q.device)
        return dq, dk, dv


def _always(q: Tensor) -> bool:
    return True


_STATE = _CudnnRagged()  # process-wide, like cuDNN's own plan cache (see the class)
# segments may start at any row (ragged offsets): in-place blocks give spans, leaving out the partnerless rows
_OPS = VarlenOps(_STATE.forward, _STATE.backward, cudnn_varlen_reason, spans=_always, even_spans=True)


def cudnn_varlen_ops() -> VarlenOps:
    """cuDNN's ragged fused attention as a varlen pair (its ``reason`` says when it cannot serve). Unlike
    FlashAttention-2's pair it leaves the rows of segments empty on one side unset (the varlen block writes them),
    and for K/V given as the halves of one ``[rows, 2, h_kv, d]`` buffer it returns dK/dV as the halves of a new
    one (strided views). ``cu_q``/``cu_k`` must not be changed in place behind the version counter (the segment
    columns are kept per tensor pair)."""
    return _OPS


def _strict_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                    causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
    reason = cudnn_varlen_reason(q)
    if reason is not None:
        raise CudnnVarlenError(f"packed_kernel='cudnn' cannot serve this call: {reason}; use packed_kernel='auto' "
                               "(FlashAttention-2 where cuDNN cannot serve) or 'flash'")
    return _STATE.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


_STRICT = VarlenOps(_strict_forward, _STATE.backward, None, spans=_always, even_spans=True)


def strict_cudnn_varlen_ops() -> VarlenOps:
    """cuDNN's pair for an explicit ``packed_kernel='cudnn'``: it never declines (which would send the block to
    the per-document loop); a call it cannot serve raises :class:`CudnnVarlenError` naming why."""
    return _STRICT


def _auto_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                  causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
    if cudnn_varlen_reason(q) is None:
        out, lse, _ = _STATE.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        return out, lse, ("cudnn", None)
    if isinstance(cu_q, Tensor) and cu_q.dim() == 2:  # spans come only where _auto_spans said cuDNN serves
        raise RuntimeError("the 'auto' varlen pair got spans for a call cuDNN cannot serve")
    out, lse, aux = flash_varlen_ops().forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    return out, lse, ("flash", aux)


def _auto_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                   cu_k: Tensor, max_q: int, max_k: int, causal: bool, scale: float,
                   aux: Any) -> tuple[Tensor, Tensor, Tensor]:
    ops = _OPS if aux[0] == "cudnn" else flash_varlen_ops()  # the pair that ran the forward
    return ops.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, aux[1])


def _auto_reason(q: Tensor) -> str | None:
    if cudnn_varlen_reason(q) is None:
        return None
    flash = flash_varlen_ops()
    return flash.reason(q) if flash.reason is not None else None


def _auto_spans(q: Tensor) -> bool:
    return cudnn_varlen_reason(q) is None  # the pair _auto_forward runs: cuDNN's takes spans, flash's does not


_AUTO = VarlenOps(_auto_forward, _auto_backward, _auto_reason, spans=_auto_spans, even_spans=True)


def auto_varlen_ops() -> VarlenOps:
    """Per call, cuDNN's ragged pair where it can serve (Hopper or newer, fp16/bf16, head dim <= 128, the
    frontend installed), else FlashAttention-2's; the backward runs the pair its forward ran."""
    return _AUTO
