"""Where a context-parallel group's ranks sit, from the host every CP rank reports (pure Python).

Rings are built over *logical* ranks ``node * gpus_per_node + local``. The CP group's ranks may sit on hosts
in any order (interleaved, strided by tensor parallelism), so the logical->CP-rank map is derived from the
host names, never assumed from rank arithmetic. Nodes are numbered by first appearance in CP-rank order;
inside a node ranks are ordered by ``local_ids`` (e.g. the CUDA device index) when given, else by CP rank.

Placements (:attr:`Placement.kind`) and the topology derived for them when none is given
(:func:`derive_topology`):

* ``one-node``: every CP rank on one host, whatever the node size (a CP group smaller than the node, or ranks
  strided inside it, e.g. GPUs 0, 2, 4, 6 with TP=2). Intra-node all-to-all: the generic single-node
  topology of the CP size and the full orthogonal rings over it.
* ``one-per-node``: one CP rank per host (TP fills the node). Every hop crosses a NIC. The topology is flat
  (``nodes=u``, ``gpus_per_node=1``, one NIC) and offers the orthogonal rings of K_u*, but on a
  rail-optimised cluster each GPU has exactly one NIC, so k rings push k pieces through the same NIC: **no
  bandwidth gain is claimed**; the cost model (``num_rings='auto'``) picks one ring there.
* ``multinode``: u >= 2 hosts with the same even number g' of CP ranks each: path-chained rings over u x g'
  (one NIC per GPU, rail-optimised), every GPU makes exactly one inter-node send per step.
* ``multinode-odd``: the same with g' odd (path-chained rings need an even g'): flat orthogonal rings over
  u x g' with the inter-node links described (several inter-node sends per GPU per step); reason logged.
* ``uneven``: hosts hold different numbers of CP ranks: the generic single-node topology of the CP size with
  ranks grouped by host (a valid plan; the cost model sees no NIC); reason logged.

A *given* topology must describe the CP group exactly (``nodes * gpus_per_node`` = CP size, and on several
nodes ``nodes`` hosts of ``gpus_per_node`` CP ranks); otherwise the error names the fix (leave the topology
unset to derive it from the hosts, or write one with the CP group's shape). Presets are not shrunk silently.
Derived topologies assume H100-class links (NVSwitch 450 GB/s, 400 Gb/s NICs); give a YAML for other
machines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_tasp.topology.descriptor import InterNode, Topology, TopologyError, generic_topology
from megatron_tasp.topology.rings import Ring

logger = logging.getLogger(__name__)

ONE_NODE, ONE_PER_NODE, MULTINODE, MULTINODE_ODD, UNEVEN = (
    "one-node", "one-per-node", "multinode", "multinode-odd", "uneven")


@dataclass(frozen=True)
class Placement:
    """The CP ranks on every node, nodes by first appearance, ranks in local order."""

    nodes: tuple[tuple[int, ...], ...]
    hosts: tuple[str, ...]

    @property
    def world_size(self) -> int:
        """CP ranks placed."""
        return sum(len(r) for r in self.nodes)

    @property
    def per_node(self) -> int | None:
        """CP ranks per node, or None when nodes hold different numbers."""
        counts = {len(r) for r in self.nodes}
        return counts.pop() if len(counts) == 1 else None

    @property
    def kind(self) -> str:
        """one-node, one-per-node, multinode, multinode-odd or uneven (see the module docstring)."""
        g = self.per_node
        if len(self.nodes) == 1:
            return ONE_NODE
        if g is None:
            return UNEVEN
        if g == 1:
            return ONE_PER_NODE
        return MULTINODE if g % 2 == 0 else MULTINODE_ODD

    def mapping(self) -> list[int]:
        """``m[logical] = cp_rank``: node after node, local order inside a node."""
        return [r for ranks in self.nodes for r in ranks]


def place(hosts: Sequence[str], local_ids: Sequence[int] | None = None) -> Placement:
    """Group CP ranks by the host each reported (``hosts[cp_rank]``)."""
    if not hosts:
        raise TopologyError("no hosts given; give one host name per CP rank")
    if local_ids is not None and len(local_ids) != len(hosts):
        raise TopologyError(f"{len(local_ids)} local ids for {len(hosts)} hosts; give one per CP rank")
    by_host: dict[str, list[int]] = {}
    for cp_rank, host in enumerate(hosts):
        by_host.setdefault(str(host), []).append(cp_rank)
    nodes = []
    for ranks in by_host.values():
        if local_ids is not None:
            ranks = sorted(ranks, key=lambda r: (local_ids[r], r))
        nodes.append(tuple(ranks))
    return Placement(nodes=tuple(nodes), hosts=tuple(str(h) for h in hosts))


def derive_topology(placement: Placement) -> tuple[Topology, str]:
    """The topology for a placement when none is given, and why it is not the ideal one ('' when it is)."""
    n, u, g, kind = placement.world_size, len(placement.nodes), placement.per_node, placement.kind
    if kind == ONE_NODE:
        return generic_topology(n), ""
    if kind == UNEVEN:
        counts = "/".join(str(len(r)) for r in placement.nodes)
        return generic_topology(n), (
            f"CP ranks per host differ ({counts} over {u} hosts): path-chained rings need the same count on every "
            f"host; using flat rings over {n} ranks grouped by host (more inter-node sends per GPU per step)")
    assert g is not None
    nic = InterNode(nics_per_node=g)
    if kind == ONE_PER_NODE:
        return Topology(name=f"hosts-{u}x1", nodes=u, gpus_per_node=1, inter_node=nic, rings_mode="flat",
                        description="one CP rank per node: every hop crosses the GPU's one NIC"), ""
    if kind == MULTINODE_ODD:
        return Topology(name=f"hosts-{u}x{g}-flat", nodes=u, gpus_per_node=g, inter_node=nic, rings_mode="flat",
                        description="odd CP ranks per node: flat rings"), (
            f"{g} CP ranks per host is odd: path-chained rings need an even count; using flat rings over "
            f"{u} x {g} ranks (more inter-node sends per GPU per step)")
    return Topology(name=f"hosts-{u}x{g}", nodes=u, gpus_per_node=g, inter_node=nic,
                    description=f"{u} nodes x {g} CP ranks, path-chained rings"), ""


def check_placement(topology: Topology, placement: Placement) -> None:
    """Raise TopologyError unless a given ``topology`` describes where the CP ranks really sit."""
    topology.check_world_size(placement.world_size)
    u = len(placement.nodes)
    names = ", ".join(sorted(set(placement.hosts)))
    if topology.nodes == 1:
        if u > 1 and topology.inter_node is None:
            raise TopologyError(
                f"topology '{topology.name}' is a single node but the CP group spans {u} hosts ({names}); pass a "
                f"multi-node topology (e.g. h100-sxm-8x{u}) or leave the topology unset to derive it from the hosts")
        return
    if u != topology.nodes:
        raise TopologyError(f"topology '{topology.name}' has {topology.nodes} nodes but the CP group spans {u} "
                            f"host(s); use a topology with nodes={u} or leave it unset to derive it from the hosts")
    for ranks in placement.nodes:
        if len(ranks) != topology.gpus_per_node:
            host = placement.hosts[ranks[0]]
            raise TopologyError(f"host {host} holds {len(ranks)} CP ranks but topology '{topology.name}' expects "
                                f"{topology.gpus_per_node} per node; place CP groups on whole nodes or leave the "
                                "topology unset to derive it from the hosts")


def place_group(hosts: Sequence[str], topology: Topology | None = None,
                local_ids: Sequence[int] | None = None) -> tuple[Topology, list[int]]:
    """The topology a CP group runs (``topology`` checked against the hosts, or derived when None) and the
    logical->CP-rank map for its rings. A derived topology that is not the ideal one logs why."""
    placement = place(hosts, local_ids)
    if topology is None:
        topology, reason = derive_topology(placement)
        if reason:
            logger.warning("TASP placement: %s", reason)
        else:
            logger.debug("TASP placement %s: topology %s", placement.kind, topology.name)
    else:
        check_placement(topology, placement)
    if topology.nodes == 1 and placement.kind != UNEVEN:
        order = list(range(placement.world_size))
        if local_ids is not None:
            order.sort(key=lambda r: (placement.hosts[r], local_ids[r]))
        return topology, order
    return topology, placement.mapping()


def logical_to_cp_ranks(topology: Topology, hosts: Sequence[str],
                        local_ids: Sequence[int] | None = None) -> list[int]:
    """Return ``m`` with ``m[logical] = cp_rank`` for a given ``topology`` and the hosts each CP rank reported."""
    return place_group(hosts, topology, local_ids)[1]


def rings_on_cp_ranks(rings: Sequence[Sequence[int]], mapping: Sequence[int]) -> list[Ring]:
    """Translate rings over logical ranks into rings over CP ranks."""
    return [[mapping[v] for v in ring] for ring in rings]


def inter_node_sends(rings: Sequence[Sequence[int]], hosts: Sequence[str]) -> list[int]:
    """For rings over CP ranks: how many pieces each CP rank sends to another host per step."""
    sends = [0] * len(hosts)
    for ring in rings:
        for j, a in enumerate(ring):
            b = ring[(j + 1) % len(ring)]
            sends[a] += hosts[a] != hosts[b]
    return sends
