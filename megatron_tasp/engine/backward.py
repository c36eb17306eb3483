"""TASP backward: each block's backward from the merged output and lse; dQ accumulates locally and the dK/dV
accumulator of every piece follows its piece one hop behind along the same ring.

dQ accumulates in fp32 (fp64 for fp64 inputs). The accumulator of every remote sub-piece starts at the first
rank that computes on it (step 1), travels in ``TaspOptions.dkv_dtype`` (fp32 by default, 'input' sends it
in the input dtype) and makes one extra hop home after the last step. At CP=2 with one chunk every dQ row
gets exactly one remote contribution, added straight into the local block's dQ (one rounding).

Two schemes. With kept KV (``keep_kv``: the forward kept the pieces it received) there is no KV traffic:
remote steps run first and the local block last, so every hop, the one home included, overlaps a kernel.
Without it the backward runs the KV rotation again (the first transfer overlapping the local block, issued
after it like the forward's), and the hop home reuses the two KV buffers. With a stream for the own block
(``call.own_stream``, CP=2 packed documents) the own block runs first on that stream in both schemes,
beside the remote block; the sums wait for both.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_tasp.engine.channel import Channel, beside, detached, fork, join, mark
from megatron_tasp.engine.compiled import CompiledCall, LocalCall, acc_dtype, bhsd, sbhd
from megatron_tasp.engine.forward import wait_all
from megatron_tasp.kernels.pairadd import add_halves
from megatron_tasp.schedule import RankStep


def halves_of_one_buffer(dk: torch.Tensor, dv: torch.Tensor) -> torch.Tensor | None:
    """The ``[m, 2, ...]`` tensor whose two halves along dim 1 are ``dk`` and ``dv`` (how cuDNN's ragged pair
    writes the gradients of a received piece, in the piece's own layout), or None when they are not."""
    if dk.shape != dv.shape or dk.stride() != dv.stride() or dk.dtype != dv.dtype or dk.dim() < 2 \
            or dk.device != dv.device or dk.numel() == 0 or not dk[0].is_contiguous():
        return None
    n = dk[0].numel()
    if (dk.shape[0] > 1 and dk.stride(0) != 2 * n) or dv.data_ptr() - dk.data_ptr() != n * dk.element_size():
        return None
    return dk.as_strided((dk.shape[0], 2, *dk.shape[1:]), (2 * n, n, *dk.stride()[1:]))


class Grads:
    """Backward accumulators of one call: dQ (rows of every remote block) and the traveling dK/dV."""

    def __init__(self, call: CompiledCall, q: torch.Tensor, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 ctxs: list):
        self.call, self.ctxs, self.lse = call, ctxs, lse
        self.qb, self.dob, self.ob = bhsd(q), bhsd(dout), bhsd(out)
        self.ci = 1  # the remote blocks' contexts follow the local one, in forward order
        self.dq: torch.Tensor | None = None  # set by the caller before remote blocks add into it
        self.pending_dq: list[tuple[slice, torch.Tensor]] = []  # CP=2: added into the local dq at the end

    def remote_lane(self, st: RankStep, j: int, views: list[torch.Tensor], chan: Channel, mid: Channel | None,
                    incoming: list | None, last: bool) -> Any:
        """Backward of lane j's blocks at step ``st`` (views: the held KV sub-pieces): dQ rows are added,
        the lane's dK/dV accumulator (incoming from the ring predecessor unless this is step 1) gets this
        rank's contribution and is posted on ``chan``; returns that Pending."""
        call = self.call
        contribs = []
        for case, rings, kernel in call.blocks[st.step][j]:
            kk, vv = call.group_kv(views, j, case, rings)
            rows = call.q_rows(case)
            dqg, dkg, dvg = kernel.backward_unchecked(
                self.dob[:, :, rows], self.qb[:, :, rows], kk, vv, self.ob[:, :, rows], self.lse[:, :, rows],
                self.ctxs[self.ci], causal=False, scale=call.scale)
            self.ci += 1
            if self.dq is None:
                self.pending_dq.append((rows, dqg))
            else:
                self.dq[:, :, rows] += dqg
            contribs.append((case, rings, dkg, dvg))
        first = st.step == 1  # every held sub-piece is in exactly one group: its first value is a copy
        if not first:
            incoming[j].wait()
            if last:  # the accumulator leaves the fp32 channel for its hop home
                chan.lane(chan.current, j).copy_(mid.lane(mid.current, j))
        acc = chan.views(j)
        for case, rings, dkg, dvg in contribs:
            off = 0
            for i in rings:
                m = call.rows_of(j, case, i)
                dk_i, dv_i = sbhd(dkg[:, :, off:off + m]), sbhd(dvg[:, :, off:off + m])
                pair = halves_of_one_buffer(dk_i, dv_i) if first else None
                if first and m == acc[i].shape[0] and dk_i.dtype == acc[i].dtype and pair is not None:
                    acc[i].copy_(pair)  # one contiguous copy (a strided stack ran ~4x slower on the H200)
                elif first and m == acc[i].shape[0] and dk_i.dtype == acc[i].dtype:
                    torch.stack((dk_i, dv_i), dim=1, out=acc[i])  # one kernel for both
                elif first:
                    acc[i][:m, 0].copy_(dk_i)
                    acc[i][:m, 1].copy_(dv_i)
                    if m < acc[i].shape[0]:
                        acc[i][m:].zero_()
                else:
                    acc[i][:m, 0] += dk_i
                    acc[i][:m, 1] += dv_i
                off += m
        return chan.start_lane(st.step, j)

    def local(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward of the local (step 0) block."""
        call = self.call
        return call.local_kernel.backward_unchecked(self.dob, self.qb, bhsd(k), bhsd(v), self.ob, self.lse,
                                             self.ctxs[0], causal=call.causal, scale=call.scale)

    def finish_dq(self, dq0: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """dQ in q's layout: the local block's dq plus every remote contribution, one rounding at CP=2."""
        if self.dq is None:  # CP=2, one chunk: one remote contribution per row, added into the kernel's dq
            dq = dq0 if dq0.dtype == q.dtype else dq0.to(acc_dtype(q.dtype), copy=True)
            for rows, dqg in self.pending_dq:
                dq[:, :, rows] += dqg
        else:
            dq = self.dq
            dq += dq0
        return sbhd(dq).to(q.dtype)


def home_sum(call: CompiledCall, home: Channel, sent: list, k, v, dk0, dv0):
    """Wait for the dK/dV of the own pieces (the hop home) and add the local block's dK/dV."""
    wait_all(sent)
    home.advance()
    rk, rv = call.unpack(home.current, like=k)
    pair = halves_of_one_buffer(rk, rv)
    if pair is not None:  # both adds in one kernel that reads each half's rows as contiguous runs
        dk, dv = add_halves(sbhd(dk0), sbhd(dv0), pair)
    else:
        dk, dv = torch.add(sbhd(dk0), rk), torch.add(sbhd(dv0), rv)
    # one rounding of the exact sum (elementwise math runs in fp32)
    return dk.to(k.dtype), dv.to(v.dtype)


def backward(call: LocalCall | CompiledCall, dout, q, k, v, out, lse, ctxs, kept):
    """Returns dq, dk, dv in the input layout and dtype.

    The own block's dK/dV stays home. The accumulator of every remote sub-piece starts at the first
    rank that computes on it (step 1), travels along the piece's ring in ``TaspOptions.dkv_dtype``
    (fp32 by default) and makes its last hop home in the input dtype, lane by lane right after that
    lane's kernels. Without kept KV the backward re-runs the KV rotation (the first transfer overlapping
    the local block, issued after it like the forward's) and only the last lane's hop home is left without
    compute to hide it; the hop home reuses the two KV buffers. With kept KV (``keep_kv``) there is no KV
    traffic at all and the local block runs last, hiding the hop home. Home adds its own contribution with
    one rounding.
    """
    plan = call.plan
    n = plan.world_size
    g = Grads(call, q, dout, out, lse, ctxs)
    if n == 1:
        dq0, dk0, dv0 = g.local(k, v)
        return sbhd(dq0).to(q.dtype), sbhd(dk0).to(k.dtype), sbhd(dv0).to(v.dtype)
    # dq: one contribution per row at CP=2 with one chunk, so adding into the kernel's own dq rounds
    # exactly once, as the fp32 accumulator would; otherwise accumulate in fp32
    mid = call.channel(call.dkv_dtype(k.dtype), k.device, "backward dKV", role="dkv") if n > 2 else None
    if kept is not None:
        return backward_kept(call, g, q, k, v, kept, mid)
    kv_chan = call.channel(k.dtype, k.device, "backward KV")  # before the mark, as in the forward
    inputs_ready = mark(q.device) if call.detach_first else None
    aux = fork(q.device, call.own_stream)  # see forward()
    with beside(aux):
        own = g.local(k, v)
    dq0, dk0, dv0 = own
    with detached(q.device, inputs_ready, call.side):
        call.pack(k, v, kv_chan.current)
        recvd = kv_chan.start(0)
    kv_chan.advance()
    if not call.single_contribution:
        g.dq = dq0.to(acc_dtype(q.dtype), copy=True)  # (no own stream: aux is None)
    home = None
    dkv_recvd: list | None = None
    sent: list = []
    for st in plan.steps[1:]:
        last = st.step == n - 1
        nxt = None
        if st.sends:
            wait_all(recvd)
            nxt = kv_chan.start(st.step)
        elif home is None:  # last step: the KV buffer not read any more carries the hop home
            home = call.channel(k.dtype, k.device, "backward dKV (hop home)",
                               buffers=[kv_chan.other, kv_chan.current])
        chan = home if last else mid
        sent = []
        for j in range(call.chunks):
            recvd[j].wait()
            sent.append(g.remote_lane(st, j, kv_chan.views(j), chan, mid, dkv_recvd, last))
        if not last:
            mid.advance()
            dkv_recvd = sent
        if nxt is not None:
            kv_chan.advance()
            recvd = nxt
    join(aux, own)
    dq = g.finish_dq(dq0, q) if call.single_contribution else sbhd(g.dq).to(q.dtype)
    return (dq, *home_sum(call, home, sent, k, v, dk0, dv0))


def backward_kept(call: CompiledCall, g: Grads, q, k, v, kept: list, mid: Channel | None):
    """Backward on the KV pieces kept by the forward: remote steps first (each dK/dV hop hidden by the
    next step's kernels), the local block last (hiding the hop home), or first on its own stream beside them."""
    n = call.plan.world_size
    # the own block first, beside the remote steps (see forward()); else last, hiding the hop home
    aux = fork(q.device, call.own_stream)
    own = None
    if aux is not None:
        with beside(aux):
            own = g.local(k, v)
    if not call.single_contribution:
        g.dq = torch.zeros(bhsd(q).shape, dtype=acc_dtype(q.dtype), device=q.device)
    home = call.channel(k.dtype, k.device, "backward dKV (hop home)",
                       buffers=[kept[n - 1], torch.empty_like(kept[n - 1])])
    kv_view = home  # any channel of this call slices kept buffers into lanes and pieces
    dkv_recvd: list | None = None
    sent: list = []
    for st in call.plan.steps[1:]:
        last = st.step == n - 1
        chan = home if last else mid
        sent = [g.remote_lane(st, j, kv_view.views(j, kept[st.step]), chan, mid, dkv_recvd, last)
                for j in range(call.chunks)]
        if not last:
            mid.advance()
            dkv_recvd = sent
    if own is None:
        own = g.local(k, v)
    join(aux, own)
    dq0, dk0, dv0 = own
    dq = g.finish_dq(dq0, q)
    return (dq, *home_sum(call, home, sent, k, v, dk0, dv0))
