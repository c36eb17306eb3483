"""TASP forward (k rings, n ranks): one causal kernel on the local shard, then n - 1 steps on pieces that
arrive along the rings, merged by log-sum-exp.

Local KV is packed into k pieces; piece i = (slice i of the front block, slice i of the back block) and
moves only along ring i. Step 0 runs one causal kernel on the local shard. At step t >= 1 a held piece from
source s is either *earlier* (s < r: every query sees its front slice) or *later* (s > r: only the back
query block sees it, all of it). Pieces of one case are concatenated so a step launches at most two
kernels. Partial results merge by log-sum-exp in fp32 (fp64 for fp64 inputs). The local kernel is queued
before the first exchange is posted (on a side stream, :func:`~megatron_tasp.engine.channel.detached`), so
the host posts it while the GPU computes. Where the call gives the own block a stream of its own
(``call.own_stream``: packed documents at CP=2), the own block runs there beside the remote block, which
waits only for its KV; the merge waits for both (:func:`~megatron_tasp.engine.channel.fork`).

Lanes (``chunks=c``): every piece travels as c sub-pieces, one message each, and a lane's kernels wait only
for that lane. At CP=2 with one chunk every output row receives exactly one remote contribution, so the
merge writes the final output straight in the input dtype (computed in fp32, rounded once).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_tasp.engine.channel import beside, detached, fork, join, mark
from megatron_tasp.engine.compiled import CompiledCall, LocalCall, acc_dtype, bhsd, sbhd
from megatron_tasp.kernels.fused_merge import merge_to


def wait_all(pending: list | None) -> None:
    """Wait for every pending exchange of a list (None: nothing)."""
    for p in pending or ():
        p.wait()


def in_output_layout(out0: torch.Tensor, q: torch.Tensor) -> bool:
    """True when a kernel output ``[b, h, s, d]`` is, seen as ``[s, b, h, d]``, a contiguous tensor of q's shape
    and dtype (cuDNN allocates its output in the query's stride order, so for Megatron's sbhd inputs it is)."""
    o = sbhd(out0)
    return o.dtype == q.dtype and o.shape == q.shape and o.is_contiguous()


def forward(call: LocalCall | CompiledCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Returns out [s, b, h, d] (input dtype), merged lse [b, h, s] (fp32), the kernels' contexts and the
    kept KV buffers (``kept[t]`` holds the pieces of step t when ``call.keep_kv``, else None).

    The first exchange (packing included) is issued after the local kernel on a side stream that waits
    only for the call's inputs. Later exchanges are posted lane by lane before each step's kernels; the
    kernels of lane j wait only for lane j's message, so with several chunks compute starts before the
    whole piece arrived.
    """
    plan = call.plan
    n = plan.world_size
    qb = bhsd(q)
    chan = call.channel(k.dtype, k.device, "forward KV", depth=n if call.keep_kv else 2) if n > 1 else None
    # allocated before the mark: memory freed by kernels queued after it must not reach the side stream
    inputs_ready = mark(q.device) if n > 1 and call.detach_first else None
    # the own block beside the remote ones where the call allows it (CP=2, one remote contribution per row)
    aux = fork(q.device, call.own_stream) if n > 1 else None
    acc_t = acc_dtype(q.dtype)
    with beside(aux):
        out0, lse0, c = call.local_kernel.forward_unchecked(qb, bhsd(k), bhsd(v), causal=call.causal,
                                                            scale=call.scale)
        # every query sees itself in the local block, so the lse is finite from here on (packed documents:
        # except padding, which no block pairs with anything; the merge keeps its -inf)
        lse = lse0 if lse0.dtype == acc_t and lse0.is_contiguous() else lse0.to(acc_t).contiguous()
    ctxs: list[Any] = [c]
    if n == 1:
        return sbhd(out0).to(q.dtype).contiguous(), lse, ctxs, None
    fused = call.fused_merge
    with detached(q.device, inputs_ready, call.side):
        call.pack(k, v, chan.current)
        recvd = chan.start(0)  # messages landing in chan.other, one per lane
    chan.advance()
    pending = [aux]  # the own block's stream until the first read of its results

    def own_results() -> None:
        if pending:
            join(pending.pop(), (out0, lse, ctxs[0]))

    if call.single_contribution and in_output_layout(out0, q):
        # every row merges at most once, and the local kernel's output already has the output's layout:
        # merge in place (rows no remote block touches keep the local result; no allocation, no copy)
        out, acc, src = sbhd(out0), out0, out0
    elif call.single_contribution:  # merge straight into a fresh output
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        acc, src = bhsd(out), out0
        if call.unmerged_rows is not None:
            own_results()
            acc[:, :, call.unmerged_rows].copy_(out0[:, :, call.unmerged_rows])
    else:
        own_results()
        acc = src = out0.to(acc_t, copy=True)
    for st in plan.steps[1:]:
        nxt = None
        if st.sends:
            wait_all(recvd)  # forward only what has arrived
            nxt = chan.start(st.step)
        for j in range(call.chunks):
            recvd[j].wait()
            views = chan.views(j)
            for case, rings, kernel in call.blocks[st.step][j]:
                kk, vv = call.group_kv(views, j, case, rings)
                rows = call.q_rows(case)
                o, l_, c = kernel.forward_unchecked(qb[:, :, rows], kk, vv, causal=False, scale=call.scale)
                own_results()
                merge_to(src[:, :, rows], lse[:, :, rows], o, l_, acc[:, :, rows], lse[:, :, rows], fused=fused)
                ctxs.append(c)
        if nxt is not None:
            chan.advance()
            recvd = nxt
    own_results()
    kept = None
    if call.keep_kv:  # buffer t holds step t's pieces (buffer 0, the own packed copy, is dropped)
        kept = [None, *chan.buffers[1:]]
    if not call.single_contribution:
        out = sbhd(acc).to(q.dtype).contiguous()
    return out, lse, ctxs, kept
