"""TASP attention, the public entry: exact softmax attention over the sequence a CP group holds.

``tasp_attention(q, k, v, cp_group)``: each rank passes only its shard, in Megatron's sbhd layout
(q ``[s_local, b, h, d]``, k/v ``[s_local, b, h_kv, d]``; GQA is never expanded). For causal attention
the local tokens are Megatron's zigzag shard: rank r holds blocks ``B_r`` and ``B_(2n-1-r)`` of the 2n
equal blocks of the sequence.

Packed documents (THD): with ``cu_seqlens_padded`` each rank passes ``[t, h, d]`` tokens laid out by
:func:`megatron_tasp.thd.partition_index`; attention stays within every document (see :mod:`megatron_tasp.thd`).

How it runs lives in :mod:`megatron_tasp.engine`: the rank plan and piece layout (``plan``), a call
compiled once per signature (``compiled``; the plan cache in ``cache`` keeps it), the forward
(``forward``), the backward (``backward``) and the transports (``exchange``). This module holds the
public functions, the input checks and the autograd Function. The hot path is one cache lookup keyed by
the call's shapes, dtypes, devices and option values; everything else happens on the first call.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.engine.backward import backward
from megatron_tasp.engine.cache import PLAN_CACHE, clear_plan_cache
from megatron_tasp.engine.compiled import CompiledCall, LocalCall, compile_call, run_summary
from megatron_tasp.engine.errors import TaspConfigError
from megatron_tasp.engine.forward import forward
from megatron_tasp.engine.graphed import graphed
from megatron_tasp.engine.thd import ThdAttention, thd_layout, thd_views
from megatron_tasp.options import TaspOptions, default_options
from megatron_tasp.topology import Topology

__all__ = ["TaspConfigError", "clear_plan_cache", "tasp_attention", "tasp_run_summary"]


class _TaspAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: CompiledCall | LocalCall, need_backward: bool):  # type: ignore[override]
        runner = graphed(call)  # CUDA graphs (options.cuda_graphs), else None
        if runner is not None:
            out, lse, kctx, kept, replayed = runner.forward(q, k, v, need_backward=need_backward)
        else:
            (out, lse, kctx, kept), replayed = forward(call, q, k, v), False
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.kctx, ctx.kept = call, kctx, kept
        ctx.graphed = runner if replayed else None  # the backward replays too when the forward did
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        # the hop home overwrites a kept buffer, so a second backward through this graph (retain_graph)
        # exchanges KV again instead of reading the kept pieces
        kept, ctx.kept = ctx.kept, None
        with torch.no_grad():
            if ctx.graphed is not None:
                dq, dk, dv = ctx.graphed.backward(dout.contiguous(), q, k, v, out, lse, kept)
            else:
                dq, dk, dv = backward(ctx.call, dout.contiguous(), q, k, v, out, lse, ctx.kctx, kept)
        return dq, dk, dv, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise TaspConfigError(f"{name} must be a 4-D tensor [s_local, b, heads, head_dim] (Megatron sbhd), "
                                  f"got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape:
        raise TaspConfigError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise TaspConfigError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on local length, batch and "
                              "head dim (self-attention over the same CP shard)")
    if q.shape[0] == 0:
        raise TaspConfigError("local sequence length is 0; every CP rank needs tokens")
    if q.shape[2] % k.shape[2]:
        raise TaspConfigError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TaspConfigError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        raise TaspConfigError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _kernel_alias(backend: str, kernel: str | None) -> str:
    if kernel is not None:
        raise TaspConfigError("give kernel= only: backend= is its deprecated alias")
    warnings.warn("tasp_attention(backend=...) is deprecated; use kernel=...", DeprecationWarning, stacklevel=4)
    return backend


def _call(q, k, v, cp_group, causal, softmax_scale, options, num_rings, topology, kernel, transport, chunks,
          keep_kv) -> CompiledCall | LocalCall:
    """The compiled call for these arguments: one cache lookup, compiled on a miss."""
    scope = PLAN_CACHE.scope(cp_group)
    try:
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, causal,
               softmax_scale, options, num_rings, topology, kernel, transport, chunks, keep_kv)
        call = scope.get(key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable option: reported below
        key = call = None
    if call is None:
        try:
            _check_inputs(q, k, v)
            problem = None
        except TaspConfigError as exc:
            problem = exc
        call = compile_call(scope, key, q, k, v, causal, softmax_scale, options,
                            (num_rings, topology, kernel, transport, chunks, keep_kv), problem, tasp_attention)
    return call


def tasp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup | None, *,
                   causal: bool = True, cu_seqlens_padded: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None, softmax_scale: float | None = None,
                   options: TaspOptions | None = None, num_rings: int | str | None = None,
                   topology: Topology | str | None = None, kernel: str | None = None, transport: str | None = None,
                   chunks: int | str | None = None, keep_kv: bool | str | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """Exact context-parallel attention with TASP's multi-ring KV exchange.

    Args:
        q: ``[s_local, b, h, d]``; k, v: ``[s_local, b, h_kv, d]`` (Megatron's sbhd; zigzag shard if causal).
            Packed documents (``cu_seqlens_padded`` given): ``[t, h, d]`` / ``[t, h_kv, d]`` (or with a
            singleton second dim), the tokens :func:`megatron_tasp.thd.partition_index` gives this rank.
        cp_group: the context-parallel process group (None or a group of size 1: plain attention).
        causal: causal mask over the global sequence (zigzag layout) or none; with packed documents causal
            within every document or full within every document, never across documents.
        cu_seqlens_padded: packed documents (THD): int tensor ``[n_docs + 1]`` of global cumulative document
            lengths, each padded at its end to a multiple of 2·CP; the same on every rank. Padding tokens
            attend to nothing and nothing attends to them: their outputs and gradients are exactly 0.
        cu_seqlens: the unpadded cumulative lengths (default: ``cu_seqlens_padded``, no padding). Either
            boundary tensor makes the call a packed-documents call. With ``options.packed_split='sequence'``
            the packed sequence was split as a whole (rank r holds chunks r and 2·CP-1-r of the sequence, the
            dense zigzag shard), documents have any length and only ``cu_seqlens`` is given.
            On CUDA a block runs its documents as one varlen launch; ``options.packed_dense_rows`` sends the
            own block's documents that large in causal calls to the dense kernel instead, padded to a bounded
            set of shapes (cuDNN plans once per shape).
        softmax_scale: defaults to 1/sqrt(d).
        options: every knob in one :class:`~megatron_tasp.options.TaspOptions` (None: ``default_options()``,
            the defaults with the ``MEGATRON_TASP_*`` environment applied, read once per process).
        num_rings, topology, kernel, transport, chunks, keep_kv: override the fields of the same name of
            ``options`` when given (see TaspOptions). ``transport='none'`` (benchmarks only) moves nothing: the
            compute-only bound, numerically wrong for CP > 1.
        backend: deprecated alias of ``kernel``.

    Every CP rank must pass the same shapes, dtype, mask and options; the first call of a signature checks
    that with one all-reduce and raises TaspConfigError on every rank otherwise.

    Returns:
        q's shape (``[s_local, b, h, d]``, or ``[t, h, d]`` for packed documents) in q's dtype; differentiable
        in q, k and v.
    """
    if backend is not None:
        kernel = _kernel_alias(backend, kernel)
    if cu_seqlens_padded is not None or cu_seqlens is not None:
        opts = options if options is not None else default_options()
        try:
            qt, kt, vt = thd_views(q, k, v)
        except TaspConfigError as exc:
            try:  # join the first call's cross-rank agreement (as a failed rank) so that every rank raises
                _call(q, k, v, cp_group, causal, softmax_scale, options, num_rings, topology, kernel, transport,
                      chunks, keep_kv)
            except TaspConfigError:
                pass
            raise exc from None
        call = _call(qt, kt, vt, cp_group, causal, softmax_scale, options, num_rings, topology, kernel, transport,
                     chunks, keep_kv)
        return ThdAttention.apply(q, k, v, thd_layout(call, cu_seqlens_padded, cu_seqlens, qt.shape[0], q.device,
                                                      opts.packed_split, dtype=qt.dtype, head_dim=qt.shape[-1]))
    call = _call(q, k, v, cp_group, causal, softmax_scale, options, num_rings, topology, kernel, transport, chunks,
                 keep_kv)
    # whether a backward can follow (known here, not inside forward, where autograd turns grad mode off)
    need_backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _TaspAttention.apply(q, k, v, call, need_backward)


def tasp_run_summary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup | None, *,
                     causal: bool = True, softmax_scale: float | None = None, options: TaspOptions | None = None,
                     num_rings: int | str | None = None, topology: Topology | str | None = None,
                     kernel: str | None = None, transport: str | None = None, chunks: int | str | None = None,
                     keep_kv: bool | str | None = None, backend: str | None = None) -> dict[str, Any]:
    """What :func:`tasp_attention` runs for these arguments ('auto' resolved): CP size, rings, transport,
    chunks, kept KV, kernel. Collective on the first call of a signature, like ``tasp_attention``."""
    if backend is not None:
        kernel = _kernel_alias(backend, kernel)
    return run_summary(_call(q, k, v, cp_group, causal, softmax_scale, options, num_rings, topology, kernel,
                             transport, chunks, keep_kv))
