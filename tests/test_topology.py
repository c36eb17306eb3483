"""Topology descriptors: presets load, validation names the field, placement, detection parsing."""

from __future__ import annotations

import pytest

from megatron_tasp.topology import (
    TopologyError,
    list_presets,
    load_topology,
    logical_to_cp_ranks,
    rings_on_cp_ranks,
    topology_from_dict,
    verify_rings,
)
from megatron_tasp.topology.detect import parse_topo_matrix, topology_from_matrix


def test_presets_load_and_give_rings():
    names = list_presets()
    for want in ("h100-sxm-8", "h100-nv18-2", "mi300x-8", "h100-sxm-8x2", "h100-sxm-8x4", "gb200-nvl72"):
        assert want in names
    for name in names:
        topo = load_topology(name)
        rings = topo.rings()
        assert len(rings) == topo.max_rings()
        verify_rings(topo.world_size, rings)
    assert load_topology("mi300x-8").intra_node.fabric == "full_mesh"
    assert load_topology("h100-sxm-8x2").multinode


@pytest.mark.parametrize("doc,needle", [
    ({"gpus_per_node": 8}, "missing required field 'name'"),
    ({"name": "x", "gpus_per_node": "eight"}, "'gpus_per_node' must be an integer"),
    ({"name": "x", "gpus_per_node": 0}, "'gpus_per_node' must be >= 1"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"fabric": "ethernet"}}, "'fabric' must be one of"),
    ({"name": "x", "gpus_per_node": 8, "nodes": 2}, "missing required field 'inter_node'"),
    ({"name": "x", "gpus_per_node": 8, "colour": "red"}, "unknown field(s) colour"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"gpu_egress_GBps": -1}}, "must be > 0"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"gpu_egress_GBps": 10, "peer_GBps": 20}}, "cannot exceed"),
    ({"name": "x", "gpus_per_node": 3, "nodes": 2, "inter_node": {"nic_GBps": 50}}, "even gpus_per_node"),
    ({"name": "x", "gpus_per_node": 8, "rings": "multinode"}, "needs nodes >= 2"),
    (["not", "a", "mapping"], "must be a mapping"),
])
def test_validation_names_the_field(doc, needle):
    with pytest.raises(TopologyError, match=None) as exc:
        topology_from_dict(doc, "t.yaml")
    assert needle in str(exc.value)
    assert str(exc.value).startswith("t.yaml")


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(TopologyError, match="malformed YAML at line"):
        load_topology(bad)
    with pytest.raises(TopologyError, match="not found"):
        load_topology(tmp_path / "nope.yaml")


def test_placement_from_hosts_reorders_interleaved_ranks():
    topo = topology_from_dict({"name": "x", "nodes": 2, "gpus_per_node": 2, "inter_node": {"nic_GBps": 50}})
    hosts = ["a", "b", "a", "b"]  # CP ranks interleaved across hosts
    mapping = logical_to_cp_ranks(topo, hosts)
    assert mapping == [0, 2, 1, 3]
    rings = rings_on_cp_ranks(topo.rings(), mapping)
    for ring in rings:  # exactly two host changes per ring (one hop out, one back)
        changes = sum(hosts[ring[j]] != hosts[ring[(j + 1) % 4]] for j in range(4))
        assert changes == 2
    with pytest.raises(TopologyError, match="holds 3 CP ranks"):
        logical_to_cp_ranks(topo, ["a", "a", "a", "b"])
    with pytest.raises(TopologyError, match="spans 1 host"):
        logical_to_cp_ranks(topo, ["a"] * 4)


TOPO_H100x2 = """\
\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tSYS\t0-15\t0\t\tN/A
GPU1\tNV18\t X \tSYS\t0-15\t0\t\tN/A

Legend:
  X    = Self
"""

TOPO_MESH = "\t" + "\t".join(f"GPU{i}" for i in range(4)) + "\n" + "\n".join(
    f"GPU{i}\t" + "\t".join(" X " if i == j else "NV2" for j in range(4)) for i in range(4))


def test_detection_parses_nvidia_smi():
    topo = topology_from_matrix(parse_topo_matrix(TOPO_H100x2), "NVIDIA H100 80GB HBM3")
    assert topo.world_size == 2 and topo.intra_node.fabric == "nvswitch"
    assert topo.intra_node.gpu_egress_GBps == 450
    mesh = topology_from_matrix(parse_topo_matrix(TOPO_MESH), "AMD")
    assert mesh.intra_node.fabric == "full_mesh" and mesh.intra_node.peer_GBps == 50
