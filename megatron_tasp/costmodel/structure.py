"""What one TASP call does, independent of the calibration: per step, the block kernels every rank runs
(exactly the groups the engine builds from the real schedule), and per exchange, the bytes each rank puts on
each resource (peer links, GPU egress, NICs) along the topology's actual rings. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from megatron_tasp.costmodel.params import CostModelError, Shape
from megatron_tasp.schedule import Schedule, split_sizes
from megatron_tasp.topology import Topology

__all__ = ["Group", "Structure", "call_structure", "ring_counts"]


@dataclass(frozen=True)
class Group:
    """One block kernel of a step: query rows x key rows, over ``pieces`` concatenated pieces."""

    q_rows: int
    kv_rows: int
    pieces: int
    causal: bool = False


@dataclass(frozen=True)
class Structure:
    """The calibration-free part of one call on one topology with k rings."""

    n: int
    k: int
    transport: str
    # per step: the distinct per-rank kernel groups (step 0 has the one own-shard kernel)
    steps: tuple[frozenset[tuple[Group, ...]], ...]
    # communication terms of one KV exchange, one per (rank, resource): (latency_us, ms at nominal bandwidth, is_nic)
    comm_terms: tuple[tuple[float, float, bool], ...]
    kv_bytes: float  # bytes one rank sends per step (K and V, input dtype)
    stage_send: bool
    stage_recv: bool


def ring_counts(topology: Topology) -> list[int]:
    """Ring counts this topology can actually build (1..max; a k whose construction fails is left out)."""
    return list(_ring_counts(topology))


@lru_cache(maxsize=128)
def _ring_counts(topology: Topology) -> tuple[int, ...]:
    out = []
    for k in range(1, topology.max_rings() + 1):
        try:
            topology.rings(k)
        except (NotImplementedError, ValueError):
            continue
        out.append(k)
    return tuple(out)


@lru_cache(maxsize=256)
def _schedule(topology: Topology, k: int) -> Schedule:
    try:
        rings = topology.rings(k)
    except NotImplementedError as exc:
        raise CostModelError(f"topology '{topology.name}' cannot build {k} rings yet ({exc}); "
                             f"available ring counts: {ring_counts(topology)}") from None
    return Schedule(rings)


def _pieces(shape: Shape, k: int) -> tuple[list[int], list[int], int]:
    """(front sizes, back sizes, half) exactly as the engine's make_pieces splits the local tokens."""
    t = shape.tokens_per_gpu
    if shape.causal:
        if t % 2:
            raise CostModelError(f"causal TASP needs an even number of tokens per GPU, got {t}")
        half = t // 2
        if half < k:
            raise CostModelError(f"{t} tokens per GPU are too few for {k} rings (each zigzag block needs >= k)")
        return split_sizes(half, k), split_sizes(half, k), half
    if t < k:
        raise CostModelError(f"{t} tokens per GPU are too few for {k} rings")
    return split_sizes(t, k), [0] * k, t


@lru_cache(maxsize=256)
def _early_counts(topology: Topology, k: int, big: int) -> tuple[frozenset[tuple[int, int]], ...]:
    """Per step t >= 1: the distinct (pieces from earlier ranks, of which among the ``big`` first rings) over
    all ranks. With split_sizes the first ``big`` pieces are one token longer, so these two counts fix the
    sizes of a rank's two causal kernel groups."""
    sched = _schedule(topology, k)
    n = sched.world_size
    per_step: list[set[tuple[int, int]]] = [set() for _ in range(n)]
    for r in range(n):
        cnt, cnt_big = [0] * n, [0] * n
        for i, ring in enumerate(sched.rings):
            p = sched.pos[i][r]
            is_big = i < big
            for t in range(1, n):
                if ring[p - t] < r:  # source of ring i's piece at step t (negative indices wrap)
                    cnt[t] += 1
                    if is_big:
                        cnt_big[t] += 1
        for t in range(1, n):
            per_step[t].add((cnt[t], cnt_big[t]))
    return tuple(frozenset(x) for x in per_step)


@lru_cache(maxsize=4096)
def call_structure(topology: Topology, k: int, shape: Shape, transport: str) -> Structure:
    sched = _schedule(topology, k)
    n = sched.world_size
    front, back, half = _pieces(shape, k)
    lengths = [f + b for f, b in zip(front, back)]
    t_local = shape.tokens_per_gpu
    steps: list[frozenset[tuple[Group, ...]]] = [frozenset({(Group(t_local, t_local, 1, shape.causal),)})]
    if not shape.causal:
        steps += [frozenset({(Group(t_local, t_local, k),)})] * (n - 1)
    else:
        q, big = divmod(half, k)  # front_i = back_i = q + (i < big)
        for counts in _early_counts(topology, k, big)[1:]:
            sigs = set()
            for ne, ne_big in counts:
                groups = []
                if ne:  # all queries x the front slices of pieces from earlier ranks
                    groups.append(Group(t_local, q * ne + ne_big, ne))
                nl, nl_big = k - ne, big - ne_big
                if nl:  # back queries x whole pieces from later ranks
                    groups.append(Group(t_local - half, 2 * (q * nl + nl_big), nl))
                sigs.add(tuple(groups))
            steps.append(frozenset(sigs))
    # communication of one KV exchange (every step moves the same pieces along the same arcs)
    row = 2 * shape.kv_row_bytes  # K and V
    gpn = topology.gpus_per_node
    intra, inter = topology.intra_node, topology.inter_node
    terms: set[tuple[float, float, bool]] = set()
    node_nic_bytes = [0.0] * topology.nodes
    stage_send = stage_recv = False
    for r in range(n):
        send = [(sched.succ(i, r), lengths[i] * row) for i in range(k)]
        recv_peers = [sched.pred(i, r) for i in range(k)]
        stage_send |= [p for p, _ in send] != sorted(p for p, _ in send)
        stage_recv |= recv_peers != sorted(recv_peers)
        intra_b = [b for p, b in send if p // gpn == r // gpn]
        inter_b = [b for p, b in send if p // gpn != r // gpn]
        for b in intra_b:  # each piece on its own peer link
            terms.add((intra.latency_us, b / 1e9 / intra.peer_GBps * 1e3, False))
        if intra_b:  # all intra-node pieces share the GPU's egress
            terms.add((intra.latency_us, sum(intra_b) / 1e9 / intra.gpu_egress_GBps * 1e3, False))
        if inter_b:
            if inter is None:
                raise CostModelError(f"topology '{topology.name}' has inter-node arcs but no inter_node section")
            terms.add((inter.latency_us, sum(inter_b) / 1e9 / inter.nic_GBps * 1e3, True))
            node_nic_bytes[r // gpn] += sum(inter_b)
    if inter is not None and any(node_nic_bytes):
        node_cap = inter.nic_GBps * inter.nics_per_node
        terms.add((inter.latency_us, max(node_nic_bytes) / 1e9 / node_cap * 1e3, True))
    if transport != "a2a":
        stage_send = stage_recv = False
    return Structure(n=n, k=k, transport=transport, steps=tuple(steps), comm_terms=tuple(sorted(terms)),
                      kv_bytes=float(sum(lengths) * row), stage_send=stage_send, stage_recv=stage_recv)
