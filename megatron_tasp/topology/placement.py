"""Map context-parallel ranks onto (node, GPU) from the real process layout (pure Python).

Rings are built over *logical* ranks ``node * gpus_per_node + local``. The CP group's ranks may sit on
hosts in any order, so the logical->CP-rank map is derived from the host name each CP rank reports
(gathered by the caller), never assumed from rank arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_tasp.topology.descriptor import Topology, TopologyError
from megatron_tasp.topology.rings import Ring


def logical_to_cp_ranks(topology: Topology, hosts: Sequence[str],
                        local_ids: Sequence[int] | None = None) -> list[int]:
    """Return ``m`` with ``m[logical] = cp_rank`` for the hosts each CP rank reported.

    Nodes are numbered by first appearance in CP-rank order; inside a node GPUs are ordered by
    ``local_ids`` (e.g. the CUDA device index) when given, else by CP rank.
    """
    n = len(hosts)
    topology.check_world_size(n)
    by_host: dict[str, list[int]] = {}
    for cp_rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(cp_rank)
    if topology.nodes == 1:
        if len(by_host) > 1 and topology.inter_node is None:
            raise TopologyError(
                f"topology '{topology.name}' is a single node but the CP group spans {len(by_host)} hosts "
                f"({', '.join(sorted(by_host))}); pass a multi-node topology (e.g. h100-sxm-8x{len(by_host)})")
        order = list(range(n))
        if local_ids is not None:
            order.sort(key=lambda r: (hosts[r], local_ids[r]))
        return order
    if len(by_host) != topology.nodes:
        raise TopologyError(f"topology '{topology.name}' has {topology.nodes} nodes but the CP group spans "
                            f"{len(by_host)} host(s); use a topology with nodes={len(by_host)}")
    mapping: list[int] = []
    for host, ranks in by_host.items():
        if len(ranks) != topology.gpus_per_node:
            raise TopologyError(f"host {host} holds {len(ranks)} CP ranks but topology '{topology.name}' expects "
                                f"{topology.gpus_per_node} per node; place CP groups on whole nodes")
        if local_ids is not None:
            ranks = sorted(ranks, key=lambda r: local_ids[r])
        mapping.extend(ranks)
    return mapping


def rings_on_cp_ranks(rings: Sequence[Sequence[int]], mapping: Sequence[int]) -> list[Ring]:
    """Translate rings over logical ranks into rings over CP ranks."""
    return [[mapping[v] for v in ring] for ring in rings]
