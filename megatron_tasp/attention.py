"""TASP attention: the multi-ring schedule x exchange x block kernels, forward and backward.

``tasp_attention(q, k, v, cp_group)`` computes exact softmax attention over the whole sequence that
the CP group holds, each rank passing only its shard. Inputs are Megatron's sbhd layout:
q ``[s_local, b, h, d]``, k/v ``[s_local, b, h_kv, d]`` (GQA is never expanded: pieces carry only the
KV heads). For causal attention the local tokens are Megatron's zigzag shard: rank r holds blocks
``B_r`` and ``B_(2n-1-r)`` of the 2n equal blocks of the sequence.

Forward (k rings, n ranks). Local KV is packed into k pieces; piece i = (slice i of the front block,
slice i of the back block) and moves only along ring i. Step 0 runs one causal kernel on the local
shard. At step t >= 1 a held piece from source s is either *earlier* (s < r: every query sees its
front slice) or *later* (s > r: only the back query block sees it, all of it). Pieces of one case are
concatenated so a step launches at most two kernels. Partial results merge by log-sum-exp in fp32
(fp64 for fp64 inputs; the same for every accumulator below). The local kernel is queued before the
first exchange is posted (on a side stream, ``exchange.detached``), so the host posts it while the GPU
computes.

Backward. Each block's backward uses the merged output and lse; dQ accumulates locally (fp32) and the
dK/dV accumulator of every piece follows its piece one hop behind along the same ring (fp32 by default,
``MEGATRON_TASP_DKV_DTYPE=input`` sends it in the input dtype), one extra hop bringing it home after the
last step. With ``keep_kv`` the forward keeps the pieces it received and the backward uses them: no KV
traffic, remote steps first and the local block last, so every hop, the one home included, overlaps a
kernel. Without it the backward runs the KV rotation again.

Lanes (``chunks=c``): every piece is cut into c sub-pieces; sub-piece j of all pieces forms lane j, sent
as its own message, and a lane's kernels wait only for that lane. At CP=2 with one chunk every output
row and dQ row receives exactly one remote contribution, so both are combined straight in the input
dtype (computed in fp32 and rounded once, as an fp32 accumulator would be) and the
merge writes the final output. Transports: ``exchange.py`` (a2a, p2p, symm).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.exchange import Channel, PieceLayout, detached, make_transport, mark
from megatron_tasp.kernels import get_kernel
from megatron_tasp.kernels.fused_merge import merge_to
from megatron_tasp.options import TaspOptions, keep_kv_auto, parse_keep_kv
from megatron_tasp.schedule import EARLIER, LATER, RankStep, compile_schedule, split_sizes
from megatron_tasp.topology import Topology, generic_topology, load_topology
from megatron_tasp.topology.placement import logical_to_cp_ranks, rings_on_cp_ranks

FULL = "full"


class TaspConfigError(ValueError):
    """Inputs or options that TASP cannot serve; the message names the fix."""


@dataclass(frozen=True)
class RankPlan:
    """Everything one rank needs to run the schedule (cached per group and options)."""

    rank: int
    world_size: int
    num_rings: int
    rings: tuple[tuple[int, ...], ...]
    steps: tuple[RankStep, ...]
    send_peers: tuple[int, ...]
    recv_peers: tuple[int, ...]
    transport: str


_PLANS: dict[tuple, RankPlan] = {}


def _resolve_topology(topology: Topology | str | os.PathLike | None, n: int) -> Topology:
    if topology is None:
        return generic_topology(n)
    if isinstance(topology, (str, Path)):
        topology = load_topology(topology)
    if not isinstance(topology, Topology):
        raise TaspConfigError(f"topology must be a Topology, a YAML path or a preset name, got {type(topology)}")
    topology.check_world_size(n)
    return topology


def _resolve_num_rings(num_rings: int | str | None, topology: Topology, shape_hint: dict | None,
                       group: dist.ProcessGroup | None = None) -> int:
    if num_rings is None:
        return topology.max_rings()
    if num_rings == "auto":
        from megatron_tasp.tuning import choose_num_rings

        return choose_num_rings(topology, shape_hint or {}, group=group)
    if isinstance(num_rings, str) and num_rings.isdigit():
        num_rings = int(num_rings)
    if not isinstance(num_rings, int) or isinstance(num_rings, bool) or num_rings < 1:
        raise TaspConfigError(f"num_rings must be a positive integer, 'auto' or None, got {num_rings!r}")
    if num_rings > topology.max_rings():
        raise TaspConfigError(f"topology '{topology.name}' offers at most {topology.max_rings()} orthogonal rings "
                              f"for {topology.world_size} ranks; got num_rings={num_rings}")
    return num_rings


def _hosts(group: dist.ProcessGroup | None, n: int) -> list[str]:
    import socket

    fake = os.environ.get("MEGATRON_TASP_FAKE_HOSTS")  # testing: emulate u nodes on one machine
    if fake:
        names = fake.split(",")
        if len(names) != n:
            raise TaspConfigError(f"MEGATRON_TASP_FAKE_HOSTS lists {len(names)} hosts for {n} CP ranks")
        return names
    hosts: list[Any] = [None] * n
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return [str(h) for h in hosts]


def rank_plan(group: dist.ProcessGroup | None, num_rings: int | str | None = None,
              topology: Topology | str | None = None, transport: str | None = None,
              shape_hint: dict | None = None) -> RankPlan:
    """Compile (once) and return this rank's TASP plan for ``group``."""
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(n))
    topo = _resolve_topology(topology, n)
    k = _resolve_num_rings(num_rings, topo, shape_hint, group)
    if transport in (None, "auto"):
        transport = os.environ.get("MEGATRON_TASP_TRANSPORT") or None
    tname = transport or ("p2p" if topo.multinode else "a2a")
    if tname == "symm" and topo.nodes > 1:
        raise TaspConfigError(f"transport 'symm' (copy engine over NVLink) needs one node; topology "
                              f"'{topo.name}' has {topo.nodes}: use transport='p2p'")
    key = (ranks, rank, k, topo, tname)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    rings = topo.rings(k)
    if topo.nodes > 1:
        rings = rings_on_cp_ranks(rings, logical_to_cp_ranks(topo, _hosts(group, n)))
    sched = compile_schedule(rings)
    steps = tuple(sched.plan(rank))
    plan = RankPlan(rank=rank, world_size=n, num_rings=k, rings=tuple(tuple(r) for r in sched.rings),
                    steps=steps, send_peers=tuple(sched.succ(i, rank) for i in range(k)),
                    recv_peers=tuple(sched.pred(i, rank) for i in range(k)), transport=tname)
    _PLANS[key] = plan
    return plan


@dataclass(frozen=True)
class Pieces:
    """How the local sequence splits into k pieces (front slice + back slice each), each piece cut
    into ``chunks`` sub-pieces; sub-piece j of every piece forms lane j (one message per step)."""

    front: tuple[tuple[int, ...], ...]  # [lane][ring]: rows of the front slice
    back: tuple[tuple[int, ...], ...]  # [lane][ring]: rows of the back slice
    half: int  # length of the front query block (causal) or the whole length (non-causal)
    perm: torch.Tensor  # local position of every packed row: lane after lane, piece after piece
    identity: bool  # perm is 0..length-1 (one ring, one chunk): packing is a plain copy

    @property
    def chunks(self) -> int:
        """Lanes (sub-pieces per piece)."""
        return len(self.front)

    def lengths(self, lane: int) -> list[int]:
        """Rows of each sub-piece of a lane."""
        return [f + b for f, b in zip(self.front[lane], self.back[lane])]


_PIECES: dict[tuple, Pieces] = {}
_RUNS: dict[tuple, _Run] = {}
_KERNELS: dict[tuple, Any] = {}


def make_pieces(length: int, k: int, causal: bool, device: torch.device, chunks: int = 1) -> Pieces:
    """Split ``length`` local tokens into k pieces of ``chunks`` sub-pieces (cached); raises
    TaspConfigError when the shard is too short."""
    key = (length, k, causal, str(device), chunks)
    if key not in _PIECES:
        _PIECES[key] = _make_pieces(length, k, causal, device, chunks)
    return _PIECES[key]


def _make_pieces(length: int, k: int, causal: bool, device: torch.device, chunks: int) -> Pieces:
    if causal:
        if length % 2:
            raise TaspConfigError(
                f"causal TASP needs an even local length (Megatron's zigzag: sequence divisible by 2*CP); "
                f"got {length} local tokens")
        half = length // 2
        if half < k:
            raise TaspConfigError(f"local length {length} is too short for {k} rings: each of the two zigzag "
                                  f"blocks ({half} tokens) must give every ring >= 1 token; use num_rings <= {half}")
        if half < k * chunks:
            raise TaspConfigError(f"local length {length} is too short for {k} rings x {chunks} chunks: each zigzag "
                                  f"block ({half} tokens) must give every sub-piece >= 1 token; use chunks <= "
                                  f"{half // k}")
        front, back = split_sizes(half, k), split_sizes(half, k)
    else:
        half = length
        if length < k:
            raise TaspConfigError(f"local length {length} is too short for {k} rings; use num_rings <= {length}")
        if length < k * chunks:
            raise TaspConfigError(f"local length {length} is too short for {k} rings x {chunks} chunks; use "
                                  f"chunks <= {length // k}")
        front, back = split_sizes(length, k), [0] * k
    fsub = [split_sizes(f, chunks) for f in front]  # [ring][lane]
    bsub = [split_sizes(b_, chunks) for b_ in back]
    fstart = [sum(front[:i]) for i in range(k)]
    bstart = [half + sum(back[:i]) for i in range(k)]
    idx: list[int] = []
    for j in range(chunks):
        for i in range(k):
            f0, b0 = fstart[i] + sum(fsub[i][:j]), bstart[i] + sum(bsub[i][:j])
            idx.extend(range(f0, f0 + fsub[i][j]))
            idx.extend(range(b0, b0 + bsub[i][j]))
    perm = torch.tensor(idx, dtype=torch.long, device=device)
    return Pieces(front=tuple(tuple(fsub[i][j] for i in range(k)) for j in range(chunks)),
                  back=tuple(tuple(bsub[i][j] for i in range(k)) for j in range(chunks)),
                  half=half, perm=perm, identity=idx == list(range(length)))


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] view -> [b, h, s, d] view."""
    return x.permute(1, 2, 0, 3)


def _sbhd(x: torch.Tensor) -> torch.Tensor:
    """[b, h, s, d] view -> [s, b, h, d] view."""
    return x.permute(2, 0, 1, 3)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators (merged output and lse, dQ, travelling dK/dV): fp32, or the input's when wider (fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _dkv_dtype(dtype: torch.dtype) -> torch.dtype:
    mode = os.environ.get("MEGATRON_TASP_DKV_DTYPE", "fp32").lower()
    if mode in ("fp32", "float32"):
        return _acc_dtype(dtype)
    if mode == "input":
        return dtype
    raise TaspConfigError(f"MEGATRON_TASP_DKV_DTYPE must be 'fp32' or 'input', got {mode!r}")


class _Run:
    """Per-call state shared by forward and backward."""

    def __init__(self, plan: RankPlan, group, kernel, causal: bool, scale: float, pieces: Pieces,
                 kv_shape: tuple[int, int, int], keep_kv: bool = False):
        self.plan, self.group, self.kernel = plan, group, kernel
        self.causal, self.scale, self.pieces = causal, scale, pieces
        self.chunks = pieces.chunks
        self.keep_kv = keep_kv and plan.world_size > 1
        b, hkv, d = kv_shape
        self.transports = []
        for j in range(self.chunks):
            layout = PieceLayout(tuple((n_, 2, b, hkv, d) for n_ in pieces.lengths(j)))
            self.transports.append(make_transport(plan.transport, group, plan.send_peers, plan.recv_peers, layout))
        # the first exchange may go on a side stream (see exchange.detached) only if posting it allocates
        # nothing that another stream could reuse while the transfer still reads it
        self.detach_first = not any(t.allocates_on_start for t in self.transports)
        # one merge per row (CP=2, one chunk): the fp32 accumulators can be skipped exactly (one rounding)
        self.single_contribution = plan.world_size == 2 and self.chunks == 1
        self.unmerged_rows: slice | None = None  # rows of the output no remote block touches (CP=2)
        if self.single_contribution and causal:
            if not any(c in (EARLIER, FULL) for st in plan.steps[1:] for c, _ in self.groups(st)):
                self.unmerged_rows = slice(None, pieces.half)

    def channel(self, dtype: torch.dtype, device: torch.device, what: str, buffers=None, role: str = "kv",
                depth: int = 2) -> Channel:
        """A channel over this run's lanes cycling through ``depth`` buffers (double-buffered by default)."""
        return Channel(self.transports, dtype, device, what, buffers, role, depth)

    def groups(self, st: RankStep) -> list[tuple[str, list[int]]]:
        """(case, rings) groups to compute at a step t >= 1."""
        if not self.causal:
            return [(FULL, list(range(self.plan.num_rings)))]
        return [(c, st.rings_with(c)) for c in (EARLIER, LATER) if st.rings_with(c)]

    def rows_of(self, lane: int, case: str, ring: int) -> int:
        """Rows of ring's sub-piece in ``lane`` that a group of ``case`` attends to."""
        return self.pieces.front[lane][ring] if case == EARLIER else \
            self.pieces.front[lane][ring] + self.pieces.back[lane][ring]

    def group_kv(self, views: list[torch.Tensor], lane: int, case: str,
                 rings: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ([b, h_kv, s, d] views or copies) of a group of held sub-pieces of one lane."""
        parts = [views[i][: self.rows_of(lane, case, i)] for i in rings]
        kv = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return _bhsd(kv[:, 0]), _bhsd(kv[:, 1])

    def q_rows(self, case: str) -> slice:
        """Query rows (local positions) a group attends from."""
        return slice(self.pieces.half, None) if case == LATER else slice(None)

    def pack(self, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Write local K/V ([s, b, h_kv, d]) into a flat buffer in piece order."""
        shaped = out.view(-1, 2, *k.shape[1:])
        if self.pieces.identity:
            shaped[:, 0].copy_(k)
            shaped[:, 1].copy_(v)
        else:
            torch.index_select(torch.stack((k, v), dim=1), 0, self.pieces.perm, out=shaped)

    def unpack(self, flat: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`pack`: flat piece buffer -> (K, V) views in local order."""
        shaped = flat.view(-1, 2, *like.shape[1:])
        if not self.pieces.identity:
            res = torch.empty_like(shaped)
            res.index_copy_(0, self.pieces.perm, shaped)
            shaped = res
        return shaped[:, 0], shaped[:, 1]


def _wait_all(pending: list | None) -> None:
    for p in pending or ():
        p.wait()


def _forward(run: _Run, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Returns out [s, b, h, d] (input dtype), merged lse [b, h, s] (fp32), the kernels' contexts and the
    kept KV buffers (``kept[t]`` holds the pieces of step t when ``run.keep_kv``, else None).

    The local kernel is queued first; the first exchange (packing included) is issued after it on a side
    stream that waits only for the call's inputs, so the host posts it while the GPU computes. Later
    exchanges are posted lane by lane before each step's kernels; the kernels of lane j wait only for
    lane j's message, so with several chunks compute starts before the whole piece arrived.
    """
    plan = run.plan
    n = plan.world_size
    qb = _bhsd(q)
    kernel = run.kernel
    chan = run.channel(k.dtype, k.device, "forward KV", depth=n if run.keep_kv else 2) if n > 1 else None
    # allocated before the mark: memory freed by kernels queued after it must not reach the side stream
    inputs_ready = mark(q.device) if n > 1 and run.detach_first else None
    out0, lse0, c = kernel.forward_unchecked(qb, _bhsd(k), _bhsd(v), causal=run.causal, scale=run.scale)
    # every query sees itself in the local block, so the lse is finite from here on
    acc_t = _acc_dtype(q.dtype)
    lse = lse0 if lse0.dtype == acc_t and lse0.is_contiguous() else lse0.to(acc_t).contiguous()
    ctxs: list[Any] = [c]
    if n == 1:
        return _sbhd(out0).to(q.dtype).contiguous(), lse, ctxs, None
    with detached(q.device, inputs_ready):
        run.pack(k, v, chan.current)
        recvd = chan.start(0)  # messages landing in chan.other, one per lane
    chan.advance()
    if run.single_contribution:  # every row merges at most once: merge straight into the output
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        acc, src = _bhsd(out), out0
        if run.unmerged_rows is not None:
            acc[:, :, run.unmerged_rows].copy_(out0[:, :, run.unmerged_rows])
    else:
        acc = src = out0.to(acc_t, copy=True)
    for st in plan.steps[1:]:
        nxt = None
        if st.sends:
            _wait_all(recvd)  # forward only what has arrived
            nxt = chan.start(st.step)
        for j in range(run.chunks):
            recvd[j].wait()
            views = chan.views(j)
            for case, rings in run.groups(st):
                kk, vv = run.group_kv(views, j, case, rings)
                rows = run.q_rows(case)
                o, l_, c = kernel.forward_unchecked(qb[:, :, rows], kk, vv, causal=False, scale=run.scale)
                merge_to(src[:, :, rows], lse[:, :, rows], o, l_, acc[:, :, rows], lse[:, :, rows])
                ctxs.append(c)
        if nxt is not None:
            chan.advance()
            recvd = nxt
    kept = None
    if run.keep_kv:  # buffer t holds step t's pieces (buffer 0, the own packed copy, is dropped)
        kept = [None, *chan.buffers[1:]]
    if not run.single_contribution:
        out = _sbhd(acc).to(q.dtype).contiguous()
    return out, lse, ctxs, kept


class _Grads:
    """Backward accumulators of one call: dQ (rows of every remote block) and the traveling dK/dV."""

    def __init__(self, run: _Run, q: torch.Tensor, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 ctxs: list):
        self.run, self.ctxs, self.lse = run, ctxs, lse
        self.qb, self.dob, self.ob = _bhsd(q), _bhsd(dout), _bhsd(out)
        self.ci = 1  # the remote blocks' contexts follow the local one, in forward order
        self.dq: torch.Tensor | None = None  # set by the caller before remote blocks add into it
        self.pending_dq: list[tuple[slice, torch.Tensor]] = []  # CP=2: added into the local dq at the end

    def remote_lane(self, st: RankStep, j: int, views: list[torch.Tensor], chan: Channel, mid: Channel | None,
                    incoming: list | None, last: bool) -> Any:
        """Backward of lane j's blocks at step ``st`` (views: the held KV sub-pieces): dQ rows are added,
        the lane's dK/dV accumulator (incoming from the ring predecessor unless this is step 1) gets this
        rank's contribution and is posted on ``chan``; returns that Pending."""
        run = self.run
        contribs = []
        for case, rings in run.groups(st):
            kk, vv = run.group_kv(views, j, case, rings)
            rows = run.q_rows(case)
            dqg, dkg, dvg = run.kernel.backward_unchecked(
                self.dob[:, :, rows], self.qb[:, :, rows], kk, vv, self.ob[:, :, rows], self.lse[:, :, rows],
                self.ctxs[self.ci], causal=False, scale=run.scale)
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
                m = run.rows_of(j, case, i)
                dk_i, dv_i = _sbhd(dkg[:, :, off:off + m]), _sbhd(dvg[:, :, off:off + m])
                if first:
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
        run = self.run
        return run.kernel.backward_unchecked(self.dob, self.qb, _bhsd(k), _bhsd(v), self.ob, self.lse,
                                             self.ctxs[0], causal=run.causal, scale=run.scale)

    def finish_dq(self, dq0: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """dQ in q's layout: the local block's dq plus every remote contribution, one rounding at CP=2."""
        if self.dq is None:  # CP=2, one chunk: one remote contribution per row, added into the kernel's dq
            dq = dq0 if dq0.dtype == q.dtype else dq0.to(_acc_dtype(q.dtype), copy=True)
            for rows, dqg in self.pending_dq:
                dq[:, :, rows] += dqg
        else:
            dq = self.dq
            dq += dq0
        return _sbhd(dq).to(q.dtype)


def _home_sum(run: _Run, home: Channel, sent: list, k, v, dk0, dv0):
    """Wait for the dK/dV of the own pieces (the hop home) and add the local block's dK/dV."""
    _wait_all(sent)
    home.advance()
    rk, rv = run.unpack(home.current, like=k)
    dk = torch.add(_sbhd(dk0), rk)  # one rounding of the exact sum (elementwise math runs in fp32)
    dv = torch.add(_sbhd(dv0), rv)
    return dk.to(k.dtype), dv.to(v.dtype)


def _backward(run: _Run, dout, q, k, v, out, lse, ctxs, kept):
    """Returns dq, dk, dv in the input layout and dtype.

    The own block's dK/dV stays home. The accumulator of every remote sub-piece starts at the first
    rank that computes on it (step 1), travels along the piece's ring in ``MEGATRON_TASP_DKV_DTYPE``
    (fp32 by default) and makes its last hop home in the input dtype, lane by lane right after that
    lane's kernels. Without kept KV the backward re-runs the KV rotation (the first transfer overlapping
    the local block, issued after it like the forward's) and only the last lane's hop home is left without
    compute to hide it; the hop home reuses the two KV buffers. With kept KV (``keep_kv``) there is no KV
    traffic at all and the local block runs last, hiding the hop home. Home adds its own contribution with
    one rounding.
    """
    plan = run.plan
    n = plan.world_size
    g = _Grads(run, q, dout, out, lse, ctxs)
    if n == 1:
        dq0, dk0, dv0 = g.local(k, v)
        return _sbhd(dq0).to(q.dtype), _sbhd(dk0).to(k.dtype), _sbhd(dv0).to(v.dtype)
    # dq: one contribution per row at CP=2 with one chunk, so adding into the kernel's own dq rounds
    # exactly once, as the fp32 accumulator would; otherwise accumulate in fp32
    mid = run.channel(_dkv_dtype(k.dtype), k.device, "backward dKV", role="dkv") if n > 2 else None
    if kept is not None:
        return _backward_kept(run, g, q, k, v, kept, mid)
    kv_chan = run.channel(k.dtype, k.device, "backward KV")  # before the mark, as in the forward
    inputs_ready = mark(q.device) if run.detach_first else None
    dq0, dk0, dv0 = g.local(k, v)
    with detached(q.device, inputs_ready):
        run.pack(k, v, kv_chan.current)
        recvd = kv_chan.start(0)
    kv_chan.advance()
    if not run.single_contribution:
        g.dq = dq0.to(_acc_dtype(q.dtype), copy=True)
    home = None
    dkv_recvd: list | None = None
    sent: list = []
    for st in plan.steps[1:]:
        last = st.step == n - 1
        nxt = None
        if st.sends:
            _wait_all(recvd)
            nxt = kv_chan.start(st.step)
        elif home is None:  # last step: the KV buffer not read any more carries the hop home
            home = run.channel(k.dtype, k.device, "backward dKV (hop home)",
                               buffers=[kv_chan.other, kv_chan.current])
        chan = home if last else mid
        sent = []
        for j in range(run.chunks):
            recvd[j].wait()
            sent.append(g.remote_lane(st, j, kv_chan.views(j), chan, mid, dkv_recvd, last))
        if not last:
            mid.advance()
            dkv_recvd = sent
        if nxt is not None:
            kv_chan.advance()
            recvd = nxt
    dq = g.finish_dq(dq0, q) if run.single_contribution else _sbhd(g.dq).to(q.dtype)
    return (dq, *_home_sum(run, home, sent, k, v, dk0, dv0))


def _backward_kept(run: _Run, g: _Grads, q, k, v, kept: list, mid: Channel | None):
    """Backward on the KV pieces kept by the forward: remote steps first (each dK/dV hop hidden by the
    next step's kernels), the local block last (hiding the hop home)."""
    n = run.plan.world_size
    if not run.single_contribution:
        g.dq = torch.zeros(_bhsd(q).shape, dtype=_acc_dtype(q.dtype), device=q.device)
    home = run.channel(k.dtype, k.device, "backward dKV (hop home)",
                       buffers=[kept[n - 1], torch.empty_like(kept[n - 1])])
    kv_view = home  # any channel of this run slices kept buffers into lanes and pieces
    dkv_recvd: list | None = None
    sent: list = []
    for st in run.plan.steps[1:]:
        last = st.step == n - 1
        chan = home if last else mid
        sent = [g.remote_lane(st, j, kv_view.views(j, kept[st.step]), chan, mid, dkv_recvd, last)
                for j in range(run.chunks)]
        if not last:
            mid.advance()
            dkv_recvd = sent
    dq0, dk0, dv0 = g.local(k, v)
    dq = g.finish_dq(dq0, q)
    return (dq, *_home_sum(run, home, sent, k, v, dk0, dv0))


class _TaspAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, run: _Run):  # type: ignore[override]
        out, lse, kctx, kept = _forward(run, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.run, ctx.kctx, ctx.kept = run, kctx, kept
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        # the hop home overwrites a kept buffer, so a second backward through this graph (retain_graph)
        # exchanges KV again instead of reading the kept pieces
        kept, ctx.kept = ctx.kept, None
        with torch.no_grad():
            dq, dk, dv = _backward(ctx.run, dout.contiguous(), q, k, v, out, lse, ctx.kctx, kept)
        return dq, dk, dv, None


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


_CHECKED_LENGTHS: set[tuple] = set()


def _check_equal_lengths(group, plan: RankPlan, length: int, device: torch.device) -> None:
    """All CP ranks must hold the same number of tokens (Megatron's split); checked once per length."""
    key = (plan.rings, plan.rank, length)
    if key in _CHECKED_LENGTHS:
        return
    t = torch.tensor([length, -length], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise TaspConfigError(f"CP ranks hold different local lengths ({lo}..{hi} tokens; this rank {length}); "
                              "TASP needs Megatron's even split: the sequence length divisible by 2*CP (causal) "
                              "or by CP (no mask)")
    _CHECKED_LENGTHS.add(key)


def tasp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup | None, *,
                   causal: bool = True, softmax_scale: float | None = None, num_rings: int | str | None = None,
                   topology: Topology | str | None = None, backend: str | None = None,
                   transport: str | None = None, chunks: int | str | None = None,
                   keep_kv: bool | str | None = None, options: TaspOptions | None = None) -> torch.Tensor:
    """Exact context-parallel attention with TASP's multi-ring KV exchange.

    Args:
        q: ``[s_local, b, h, d]``; k, v: ``[s_local, b, h_kv, d]`` (Megatron's sbhd; zigzag shard if causal).
        cp_group: the context-parallel process group (None or a group of size 1: plain attention).
        causal: causal mask over the global sequence (zigzag layout) or none.
        softmax_scale: defaults to 1/sqrt(d).
        num_rings: rings to use (default: the topology's maximum; 1 = zigzag ring attention; 'auto').
        topology: a Topology, a YAML path or a shipped preset name (default: all-to-all single node).
        backend: block-kernel name (default: automatic, see ``megatron_tasp.kernels``).
        transport: 'a2a' or 'p2p' (default: a2a on one node, p2p across nodes).
        chunks: messages per piece and step (default ``MEGATRON_TASP_CHUNKS`` or 1; 'auto' asks the cost
            model). With c > 1 every piece travels as c sub-pieces and each sub-piece's kernels start as
            soon as it lands, hiding transfers longer than one block's compute and all but 1/c of the
            backward's last dK/dV hop; each step launches c times as many kernels.
        keep_kv: keep the KV pieces received in the forward for the backward (True), or exchange them
            again there (False). Keeping costs (n - 1) x the local K/V memory per call until its backward
            and saves the backward's whole KV rotation (a third of the traffic and of the launches), and
            lets the local block hide the last dK/dV hop. Default ``MEGATRON_TASP_KEEP_KV`` or 'auto':
            keep when that memory is at most ``MEGATRON_TASP_KEEP_KV_MIB`` (64) MiB and the transport
            allocates per call (not 'symm', whose two persistent buffers are reused by every call).

    Returns:
        ``[s_local, b, h, d]`` in q's dtype; differentiable in q, k and v.
    """
    if options is not None:
        num_rings, topology, backend, transport, chunks, keep_kv = _from_options(
            options, num_rings, topology, backend, transport, chunks, keep_kv)
    run = _resolve_run(q, k, v, cp_group, causal, softmax_scale, num_rings, topology, backend, transport, chunks,
                       keep_kv)
    return _TaspAttention.apply(q, k, v, run)


def _from_options(options: TaspOptions, num_rings, topology, backend, transport, chunks, keep_kv) -> tuple:
    """Keyword arguments given explicitly win over the fields of ``options``."""
    pick = lambda given, field: field if given is None else given  # noqa: E731
    return (pick(num_rings, options.num_rings), pick(topology, options.topology), pick(backend, options.kernel),
            pick(transport, options.transport), pick(chunks, options.chunks), pick(keep_kv, options.keep_kv))


def _resolve_run(q, k, v, cp_group, causal, softmax_scale, num_rings, topology, backend, transport, chunks,
                 keep_kv=None):
    _check_inputs(q, k, v)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kkey = (backend, os.environ.get("MEGATRON_TASP_KERNEL"), str(q.device), q.dtype, q.shape[-1])
    kernel = _KERNELS.get(kkey)
    if kernel is None:
        kernel = _KERNELS[kkey] = get_kernel(backend, q.device, q.dtype, q.shape[-1])
    n = dist.get_world_size(cp_group) if cp_group is not None else 1
    if n == 1:
        return _LocalRun(kernel, causal, scale)
    env = (os.environ.get("MEGATRON_TASP_TRANSPORT"), os.environ.get("MEGATRON_TASP_CHUNKS"),
           os.environ.get("MEGATRON_TASP_KEEP_KV"), os.environ.get("MEGATRON_TASP_KEEP_KV_MIB"))
    fkey = (id(cp_group), num_rings, topology if isinstance(topology, (str, type(None))) else id(topology),
            transport, chunks, keep_kv, env, id(kernel), causal, scale, tuple(q.shape), tuple(k.shape),
            str(q.device), q.dtype)
    run = _FAST.get(fkey)
    if run is None:
        run = _FAST[fkey] = _make_run(q, k, cp_group, kernel, causal, scale, num_rings, topology, transport,
                                      chunks, keep_kv)
    return run


def tasp_run_summary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup | None, *,
                     causal: bool = True, softmax_scale: float | None = None, num_rings: int | str | None = None,
                     topology: Topology | str | None = None, backend: str | None = None,
                     transport: str | None = None, chunks: int | str | None = None,
                     keep_kv: bool | str | None = None, options: TaspOptions | None = None) -> dict[str, Any]:
    """What :func:`tasp_attention` runs for these arguments ('auto' resolved): rings, transport, chunks,
    kept KV, kernel.

    Collective on the first call for a shape (like ``tasp_attention`` itself); cached afterwards.
    """
    if options is not None:
        num_rings, topology, backend, transport, chunks, keep_kv = _from_options(
            options, num_rings, topology, backend, transport, chunks, keep_kv)
    run = _resolve_run(q, k, v, cp_group, causal, softmax_scale, num_rings, topology, backend, transport, chunks,
                       keep_kv)
    return {"cp": run.plan.world_size, "num_rings": run.plan.num_rings, "transport": run.plan.transport,
            "chunks": run.chunks, "keep_kv": run.keep_kv, "kernel": run.kernel.name}


_FAST: dict[tuple, _Run] = {}


def _resolve_chunks(chunks: int | str | None, plan: RankPlan, hint: dict, topology) -> int:
    if chunks is None:
        chunks = os.environ.get("MEGATRON_TASP_CHUNKS") or 1
    if chunks == "auto":
        from megatron_tasp.tuning import choose_chunks

        return choose_chunks(_resolve_topology(topology, plan.world_size), hint, plan.num_rings, plan.transport)
    if isinstance(chunks, str) and chunks.isdigit():
        chunks = int(chunks)
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise TaspConfigError(f"chunks must be a positive integer or 'auto' (MEGATRON_TASP_CHUNKS too), got {chunks!r}")
    return chunks


def _resolve_keep_kv(keep_kv: bool | str | None, plan: RankPlan, k: torch.Tensor) -> bool:
    try:
        keep = parse_keep_kv(os.environ.get("MEGATRON_TASP_KEEP_KV") or "auto" if keep_kv is None else keep_kv)
        if keep == "auto":
            return keep_kv_auto(plan.world_size, 2 * k.numel() * k.element_size(), plan.transport)
    except ValueError as exc:
        raise TaspConfigError(f"{exc} (tasp_attention's keep_kv, MEGATRON_TASP_KEEP_KV)") from None
    if keep and plan.transport == "symm":
        raise TaspConfigError("keep_kv=True needs per-call KV buffers, but transport 'symm' moves pieces through two "
                              "persistent symmetric-memory buffers shared by every call: use keep_kv=False (or "
                              "'auto') with 'symm', or transport='a2a'")
    return keep


def _make_run(q, k, cp_group, kernel, causal, scale, num_rings, topology, transport, chunks,
              keep_kv=None) -> _Run:
    """Plan, pieces and transports for one call signature (cached by the caller)."""
    hint = {"tokens_per_gpu": q.shape[0], "batch": q.shape[1], "heads_q": q.shape[2],
            "heads_kv": k.shape[2], "head_dim": q.shape[3], "causal": causal, "dtype_bytes": q.element_size()}
    plan = rank_plan(cp_group, num_rings, topology, transport, hint)
    _check_equal_lengths(cp_group, plan, q.shape[0], q.device)
    c = _resolve_chunks(chunks, plan, hint, topology)
    keep = _resolve_keep_kv(keep_kv, plan, k)
    rkey = (plan, id(cp_group), id(kernel), causal, scale, q.shape[0], tuple(k.shape[1:]), str(q.device), c, keep)
    run = _RUNS.get(rkey)
    if run is None:
        pieces = make_pieces(q.shape[0], plan.num_rings, causal, q.device, c)
        run = _RUNS[rkey] = _Run(plan, cp_group, kernel, causal, scale, pieces, (k.shape[1], k.shape[2], k.shape[3]),
                                 keep)
    return run


class _LocalRun:
    """CP size 1: one kernel, no exchange."""

    def __init__(self, kernel, causal: bool, scale: float):
        self.plan = RankPlan(0, 1, 1, ((0,),), (RankStep(0, (), (), ()),), (), (), "none")
        self.kernel, self.causal, self.scale = kernel, causal, scale
        self.keep_kv = False
        self.chunks = 1
