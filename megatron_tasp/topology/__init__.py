"""Topology layer: hardware descriptors and verified orthogonal ring decompositions (no torch)."""

from megatron_tasp.topology.descriptor import (
    InterNode,
    IntraNode,
    Topology,
    TopologyError,
    generic_topology,
    list_presets,
    load_topology,
    topology_from_dict,
)
from megatron_tasp.topology.placement import (
    Placement,
    derive_topology,
    inter_node_sends,
    logical_to_cp_ranks,
    place,
    place_group,
    rings_on_cp_ranks,
)
from megatron_tasp.topology.rings import (
    MAX_WORLD_SIZE,
    RingError,
    hamiltonian_rings,
    inter_node_arcs,
    max_rings,
    multinode_rings,
    verify_rings,
)

__all__ = [
    "MAX_WORLD_SIZE", "InterNode", "IntraNode", "Placement", "RingError", "Topology", "TopologyError",
    "derive_topology", "generic_topology", "hamiltonian_rings", "inter_node_arcs", "inter_node_sends",
    "list_presets", "load_topology", "logical_to_cp_ranks", "max_rings", "multinode_rings", "place",
    "place_group", "rings_on_cp_ranks", "topology_from_dict", "verify_rings",
]
