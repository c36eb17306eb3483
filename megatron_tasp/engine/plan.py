"""Rank planning: which topology and rings a CP group runs, where its ranks sit, and how the local
sequence splits into pieces.

* :func:`resolve_topology` turns the ``topology`` option (None, a preset name, a YAML path or a Topology)
  into a Topology; :func:`check_rings` and :func:`check_transport` validate ``num_rings`` and ``transport``
  against it. These run identically at CP=1 (without the world-size check) and CP>1, before any collective.
* :func:`build_rank_plan` compiles the schedule for this rank: rings over CP ranks (on several nodes the
  logical->CP-rank map comes from the host of every CP rank, ``TaspOptions.hosts`` or gathered), the steps,
  and the ring successors/predecessors.
* :class:`Pieces` / :func:`make_pieces`: the local KV splits into k pieces, piece i = (slice i of the
  front zigzag block, slice i of the back block); each piece is cut into ``chunks`` sub-pieces, sub-piece j
  of every piece forming lane j (one message per step).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.engine.errors import TaspConfigError
from megatron_tasp.options import TaspOptions
from megatron_tasp.schedule import RankStep, compile_schedule, split_sizes
from megatron_tasp.topology import Topology, TopologyError, generic_topology, load_topology
from megatron_tasp.topology.placement import derive_topology, place, place_group, rings_on_cp_ranks
from megatron_tasp.tuning import choose_num_rings

logger = logging.getLogger(__name__)


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


#: CP size 1: one local block, no exchange.
LOCAL_PLAN = RankPlan(0, 1, 1, ((0,),), (RankStep(0, (), (), ()),), (), (), "none")


def resolve_topology(topology: Topology | str | os.PathLike | None, n: int,
                     hosts: tuple[str, ...] | None = None) -> Topology | None:
    """The Topology for a CP group of ``n`` ranks (None at CP=1 without one). A preset name or path that
    does not exist raises at every CP size; the size must match the group only for n > 1. With ``hosts``
    (one per CP rank, known without a collective) and no topology, the topology is derived from where the
    ranks sit (:func:`megatron_tasp.topology.placement.derive_topology`); without them the single-node
    generic topology stands in until :func:`build_rank_plan` sees the hosts."""
    if topology is None:
        if n > 1 and hosts is not None and len(hosts) == n:
            return derive_topology(place(hosts))[0]
        return generic_topology(n) if n > 1 else None
    if isinstance(topology, (str, os.PathLike)):
        try:
            topology = load_topology(topology)
        except TopologyError as exc:
            raise TaspConfigError(str(exc)) from None
    if not isinstance(topology, Topology):
        raise TaspConfigError(f"topology must be a Topology, a YAML path or a preset name, got {type(topology)}")
    if n > 1:
        try:
            topology.check_world_size(n)
        except TopologyError as exc:
            raise TaspConfigError(f"{exc} (or leave the topology unset to derive it from the hosts)") from None
    return topology


def check_rings(num_rings: int | str | None, topology: Topology | None) -> None:
    """Reject a ring count the topology cannot build (CP=1 without a topology: one ring at most)."""
    if num_rings is None or num_rings == "auto":
        return
    most = topology.max_rings() if topology is not None else 1
    if num_rings > most:
        name = topology.name if topology is not None else "one rank (CP=1)"
        ranks = topology.world_size if topology is not None else 1
        raise TaspConfigError(f"topology '{name}' offers at most {most} orthogonal rings for {ranks} ranks; "
                              f"got num_rings={num_rings}")


def transport_name(transport: str | None, topology: Topology | None) -> str:
    """The transport a call uses: the option, else a2a on one node and p2p across nodes."""
    if transport is not None:
        return transport
    return "p2p" if topology is not None and topology.multinode else "a2a"


def check_transport(transport: str, topology: Topology | None, device: torch.device) -> None:
    """'symm' moves pieces GPU to GPU with the copy engine: one node, CUDA tensors."""
    if transport != "symm":
        return
    if topology is not None and topology.nodes > 1:
        raise TaspConfigError(f"transport 'symm' (copy engine over NVLink) needs one node; topology "
                              f"'{topology.name}' has {topology.nodes}: use transport='p2p'")
    if device.type != "cuda":
        raise TaspConfigError("transport 'symm' needs CUDA devices on one NVLink node; use 'a2a' or 'p2p'")


def resolve_num_rings(num_rings: int | str | None, topology: Topology, hint: dict[str, Any], group: Any,
                      options: TaspOptions | None = None, transport: str | None = None,
                      attention: Any = None) -> int:
    """The ring count: the topology's most (None), the cost model's choice ('auto': calibration, probe and
    dK/dV dtype from ``options``, for ``transport``; ``attention`` is what a probe times), or as given."""
    if num_rings is None:
        return topology.max_rings()
    if num_rings == "auto":
        return choose_num_rings(topology, hint, options=options, transport=transport, group=group,
                                attention=attention)
    return int(num_rings)


def gather_hosts(group: dist.ProcessGroup | None, n: int, hosts: tuple[str, ...] | None) -> list[str]:
    """The host of every CP rank in group order: ``hosts`` when given (emulating nodes), else gathered
    (a collective)."""
    if hosts is not None:
        if len(hosts) != n:
            raise TaspConfigError(f"hosts lists {len(hosts)} hosts for {n} CP ranks; give one per CP rank "
                                  "(TaspOptions.hosts, MEGATRON_TASP_HOSTS)")
        return list(hosts)
    found: list[Any] = [None] * n
    dist.all_gather_object(found, socket.gethostname(), group=group)
    return [str(h) for h in found]


def build_rank_plan(group: dist.ProcessGroup | None, topology: Topology, num_rings: int, transport: str,
                    hosts: tuple[str, ...] | None) -> RankPlan:
    """Compile this rank's schedule for ``group``: rings over CP ranks placed by the host of every CP rank
    (``hosts``, else gathered: a collective). A given multi-node ``topology`` is checked against the hosts;
    the generic single-node one (no topology given) is replaced by the one derived from the hosts, its
    ring count capped at what that topology offers (logged)."""
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    derive = topology == generic_topology(n)
    if topology.nodes > 1 or derive:
        try:
            placed, mapping = place_group(gather_hosts(group, n, hosts), None if derive else topology)
        except TopologyError as exc:
            raise TaspConfigError(str(exc)) from None
        if placed != topology and num_rings > placed.max_rings():
            logger.warning("TASP: the CP ranks' hosts give topology '%s' (%d ring(s) at most); num_rings %d -> %d",
                           placed.name, placed.max_rings(), num_rings, placed.max_rings())
            num_rings = placed.max_rings()
        rings = rings_on_cp_ranks(placed.rings(num_rings), mapping)
    else:
        rings = topology.rings(num_rings)
    sched = compile_schedule(rings)
    k = len(sched.rings)
    return RankPlan(rank=rank, world_size=n, num_rings=k, rings=tuple(tuple(r) for r in sched.rings),
                    steps=tuple(sched.plan(rank)), send_peers=tuple(sched.succ(i, rank) for i in range(k)),
                    recv_peers=tuple(sched.pred(i, rank) for i in range(k)), transport=transport)


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


def make_pieces(length: int, k: int, causal: bool, device: torch.device, chunks: int = 1) -> Pieces:
    """Split ``length`` local tokens into k pieces of ``chunks`` sub-pieces; raises TaspConfigError when the
    shard is too short."""
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
