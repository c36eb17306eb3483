"""Topology descriptors: presets load, validation names the field, placement, detection parsing."""

from __future__ import annotations

import pytest

from megatron_tasp.topology import (
    InterNode,
    IntraNode,
    TopologyError,
    list_presets,
    load_topology,
    logical_to_cp_ranks,
    rings_on_cp_ranks,
    topology_from_dict,
    verify_rings,
)
from megatron_tasp.topology.descriptor import preset_path
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
    ({"gpus_per_node": 8}, "name: missing required field"),
    ({"name": "x", "gpus_per_node": "eight"}, "gpus_per_node must be an integer"),
    ({"name": "x", "gpus_per_node": 0}, "gpus_per_node must be an integer (>= 1), got 0"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"fabric": "ethernet"}}, "intra_node.fabric must be one of"),
    ({"name": "x", "gpus_per_node": 8, "nodes": 2}, "inter_node: missing required field"),
    ({"name": "x", "gpus_per_node": 8, "colour": "red"}, "unknown field(s) colour"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"gpu_egress_GBps": -1}},
     "intra_node.gpu_egress_GBps must be a number (> 0)"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"gpu_egress_GBps": 10, "peer_GBps": 20}}, "cannot exceed"),
    ({"name": "x", "gpus_per_node": 3, "nodes": 2, "inter_node": {"nic_GBps": 50}}, "even gpus_per_node"),
    ({"name": "x", "gpus_per_node": 8, "rings": "multinode"}, "needs nodes >= 2"),
    (["not", "a", "mapping"], "must be a mapping"),
    (None, "the document must be a mapping of fields, got NoneType"),
    ({"name": "x", "gpus_per_node": 8, "nodes": True}, "nodes must be an integer (>= 1), got True"),
    ({"name": "x", "gpus_per_node": 8.0}, "gpus_per_node must be an integer (>= 1), got 8.0"),
    ({"name": " ", "gpus_per_node": 8}, "name must be a string"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": [1]}, "intra_node must be a mapping of fields, got list"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"bandwidth": 1}},
     "intra_node: unknown field(s) bandwidth; allowed: fabric, gpu_egress_GBps, peer_GBps, latency_us"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"latency_us": 0}},
     "intra_node.latency_us must be a number (> 0)"),
    ({"name": "x", "gpus_per_node": 8, "intra_node": {"peer_GBps": True}}, "intra_node.peer_GBps must be a number"),
    ({"name": "x", "gpus_per_node": 8, "nodes": 2, "inter_node": {}}, "inter_node.nic_GBps: missing required field"),
    ({"name": "x", "gpus_per_node": 8, "nodes": 2, "inter_node": {"nic_GBps": 50, "rail_optimized": 1}},
     "inter_node.rail_optimized must be true or false, got 1"),
    ({"name": "x", "gpus_per_node": 8, "nodes": 2, "inter_node": {"nic_GBps": 50, "nics_per_node": 0}},
     "inter_node.nics_per_node must be an integer (>= 1) or null, got 0"),
    ({"name": "x", "gpus_per_node": 8, "rings": "ring"}, "rings must be one of auto, flat, multinode, got 'ring'"),
])
def test_validation_names_the_field(doc, needle):
    with pytest.raises(TopologyError, match=None) as exc:
        topology_from_dict(doc, "t.yaml")
    assert needle in str(exc.value)
    assert str(exc.value).startswith("t.yaml")


def test_shipped_presets_load_exactly_as_written():
    """Every field of every shipped YAML reaches the Topology unchanged (numbers as floats where the
    dataclass says float), and what a file leaves out gets the documented default."""
    import yaml

    for name in list_presets():
        path = preset_path(name)
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        topo = load_topology(name)
        assert (topo.name, topo.nodes, topo.gpus_per_node) == (raw["name"], raw.get("nodes", 1), raw["gpus_per_node"])
        assert topo.rings_mode == raw.get("rings", "auto") and topo.description == raw.get("description", "")
        assert topo.source == str(path)
        intra = raw.get("intra_node", {})
        assert topo.intra_node.fabric == intra.get("fabric", "nvswitch")
        for key in ("gpu_egress_GBps", "peer_GBps", "latency_us"):
            value = getattr(topo.intra_node, key)
            assert type(value) is float and value == intra.get(key, value), (name, key)
        if "inter_node" in raw:
            for key, value in raw["inter_node"].items():
                assert getattr(topo.inter_node, key) == value, (name, key)
            assert type(topo.inter_node.nic_GBps) is float
        else:
            assert topo.inter_node is None


def test_defaults_follow_other_fields():
    topo = topology_from_dict({"name": "x", "nodes": 2, "gpus_per_node": 4, "intra_node": {"gpu_egress_GBps": 300},
                               "inter_node": {"nic_GBps": 25}})
    assert topo.intra_node == IntraNode("nvswitch", 300.0, 300.0, 3.0)  # peer_GBps defaults to the egress
    assert topo.inter_node == InterNode(25.0, 4, True, 8.0)  # nics_per_node defaults to gpus_per_node
    assert topology_from_dict({"name": "x", "gpus_per_node": 2, "intra_node": None}).intra_node == IntraNode()


def test_topology_layer_imports_no_apps_and_no_torch():
    import subprocess
    import sys

    code = ("import sys; from megatron_tasp.topology import load_topology; load_topology('h100-sxm-8x2'); "
            "print([m for m in sys.modules if m == 'torch' or m.startswith('megatron_tasp.apps')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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
