"""Placement of a CP group from fake host lists: one node (strided, smaller than the node), one CP rank per
node, several per node (even: path-chained, odd: flat), uneven; plans verify, inter-node sends per GPU per
step counted; given topologies checked against the hosts; one engine-level CPU run per layout is exact."""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_tasp.costmodel.model import predict
from megatron_tasp.costmodel.params import Shape
from megatron_tasp.engine.errors import TaspConfigError
from megatron_tasp.engine.plan import resolve_topology
from megatron_tasp.launch import run_workers
from megatron_tasp.schedule import compile_schedule
from megatron_tasp.topology import (
    TopologyError,
    derive_topology,
    generic_topology,
    inter_node_sends,
    load_topology,
    place,
    place_group,
    rings_on_cp_ranks,
    verify_rings,
)
from megatron_tasp.tuning import choose_num_rings
from tests.attn_reference import reference_attention, rel_err, zigzag_index

HINT = {"tokens_per_gpu": 8192, "batch": 1, "heads_q": 32, "heads_kv": 8, "head_dim": 128, "causal": True,
        "dtype_bytes": 2}


def _plan(hosts, topology=None, local_ids=None, k=None):
    """Topology, rings over CP ranks (verified and compiled) and inter-node sends per CP rank per step."""
    topo, mapping = place_group(hosts, topology, local_ids)
    assert sorted(mapping) == list(range(len(hosts)))
    rings = rings_on_cp_ranks(topo.rings(k), mapping)
    verify_rings(len(hosts), rings)
    compile_schedule(rings)
    return topo, rings, inter_node_sends(rings, hosts)


@pytest.mark.parametrize("hosts,local_ids", [
    (["n0"] * 4, [0, 2, 4, 6]),  # TP=2 on an 8-GPU node: CP ranks on GPUs 0, 2, 4, 6
    (["n0"] * 3, None),  # a CP group smaller than the node
    (["n0"] * 8, None),  # the whole node
])
def test_one_node_gives_the_full_single_node_rings(hosts, local_ids):
    n = len(hosts)
    assert place(hosts).kind == "one-node"
    topo, rings, sends = _plan(hosts, local_ids=local_ids)
    assert topo == generic_topology(n) and topo.nodes == 1
    assert len(rings) == topo.max_rings() == {3: 2, 4: 2, 8: 7}[n]
    assert rings[0] == list(range(n))  # Megatron's ring order
    assert sends == [0] * n


@pytest.mark.parametrize("u", [2, 4, 8])
def test_one_cp_rank_per_node_plans_all_rings_but_claims_no_gain(u):
    hosts = [f"node{i}" for i in range(u)]
    assert place(hosts).kind == "one-per-node"
    topo, rings, sends = _plan(hosts)
    assert (topo.nodes, topo.gpus_per_node, topo.inter_node.nics_per_node) == (u, 1, 1)
    assert len(rings) == topo.max_rings() >= 1
    assert sends == [len(rings)] * u  # every piece crosses the GPU's one NIC
    assert choose_num_rings(topo, HINT) == 1
    shape = Shape(tokens_per_gpu=8192, batch=1, heads_q=32, heads_kv=8, head_dim=128, causal=True)
    one, most = (predict(topo, shape, k) for k in (1, topo.max_rings()))
    assert most.comm_ms >= one.comm_ms * 0.999  # more rings: no more NIC bandwidth


def test_one_cp_rank_per_node_maps_scattered_hosts():
    hosts = ["c", "a", "d", "b"]
    topo, rings, _ = _plan(hosts)
    assert place(hosts).mapping() == [0, 1, 2, 3]  # nodes by first appearance: one rank each
    assert topo.world_size == 4 and all(sorted(r) == [0, 1, 2, 3] for r in rings)


@pytest.mark.parametrize("hosts", [
    ["a", "b"] * 4,  # strided: CP ranks alternate between the nodes
    ["a"] * 4 + ["b"] * 4,  # blocked
    ["x", "y", "z", "w"] * 2,  # 4 nodes x 2, strided
    [f"h{i // 4}" for i in range(16)],  # 4 nodes x 4
])
def test_several_per_node_gives_path_chained_rings(hosts):
    p = place(hosts)
    u, g = len(p.nodes), p.per_node
    assert p.kind == "multinode"
    topo, rings, sends = _plan(hosts)
    assert (topo.nodes, topo.gpus_per_node, topo.multinode) == (u, g, True)
    assert len(rings) == g
    assert sends == [1] * len(hosts)  # one inter-node send per GPU per step
    for ring in rings:  # each node's ranks are visited contiguously
        changes = sum(hosts[ring[j]] != hosts[ring[(j + 1) % len(ring)]] for j in range(len(ring)))
        assert changes == u
    local = {r: i for ranks in p.nodes for i, r in enumerate(ranks)}
    if u % 2 == 0:  # every inter-node hop stays on its rail (same local index)
        for ring in rings:
            for j, a in enumerate(ring):
                b = ring[(j + 1) % len(ring)]
                if hosts[a] != hosts[b]:
                    assert local[a] == local[b]


def test_local_ids_order_ranks_inside_a_node():
    hosts = ["a", "a", "b", "b"]
    assert place(hosts, [1, 0, 3, 2]).mapping() == [1, 0, 3, 2]
    with pytest.raises(TopologyError, match="local ids"):
        place(hosts, [0])


def test_odd_ranks_per_node_fall_back_to_flat_rings(caplog):
    hosts = ["a", "b"] * 3  # 2 nodes x 3
    with caplog.at_level(logging.WARNING, logger="megatron_tasp.topology.placement"):
        topo, rings, sends = _plan(hosts)
    assert "odd" in caplog.text and place(hosts).kind == "multinode-odd"
    assert (topo.nodes, topo.gpus_per_node, topo.multinode) == (2, 3, False)
    assert len(rings) == topo.max_rings() == 4
    assert max(sends) >= 1 and sum(sends) >= 2 * len(rings)


@pytest.mark.parametrize("hosts", [["a"] * 3 + ["b"] * 5, ["a", "b", "b", "c", "c", "c"]])
def test_uneven_hosts_give_a_generic_plan_with_a_reason(hosts, caplog):
    n = len(hosts)
    with caplog.at_level(logging.WARNING, logger="megatron_tasp.topology.placement"):
        topo, rings, sends = _plan(hosts)
    assert "differ" in caplog.text and place(hosts).kind == "uneven"
    assert topo == generic_topology(n) and len(rings) == topo.max_rings()
    _, m = place_group(hosts)
    assert [hosts[r] for r in m] == sorted(hosts, key=hosts.index)  # grouped by host
    assert all(s >= 1 for s in sends)


def test_given_topology_is_checked_against_the_hosts():
    x2 = load_topology("h100-sxm-8x2")
    hosts = ["a", "b"] * 8
    topo, rings, sends = _plan(hosts, x2)
    assert topo is x2 and sends == [1] * 16
    with pytest.raises(TopologyError, match="nodes=4"):
        place_group([f"h{i // 4}" for i in range(16)], x2)
    with pytest.raises(TopologyError, match="holds 6 CP ranks.*derive it from the hosts"):
        place_group(["a"] * 6 + ["b"] * 10, x2)
    with pytest.raises(TopologyError, match="single node.*h100-sxm-8x2"):
        place_group(["a"] * 4 + ["b"] * 4, load_topology("h100-sxm-8"))


def test_resolve_topology_derives_from_known_hosts_and_fails_closed_on_size():
    assert resolve_topology(None, 4) == generic_topology(4)
    assert resolve_topology(None, 4, ("a", "b", "a", "b")).name == "hosts-2x2"
    assert resolve_topology(None, 4, ("a", "b", "c", "d")).name == "hosts-4x1"
    assert resolve_topology(None, 4, ("a",) * 4) == generic_topology(4)
    with pytest.raises(TaspConfigError, match="h100-sxm-8.*4 ranks.*leave the topology unset"):
        resolve_topology("h100-sxm-8", 4, ("a",) * 4)  # a preset is never shrunk silently
    with pytest.raises(TaspConfigError, match="h100-sxm-8x2"):
        resolve_topology("h100-sxm-8x2", 8)


def test_derived_topologies_for_every_kind():
    for hosts, name in ((["a"] * 2, "generic-2"), (["a", "b"], "hosts-2x1"), (["a", "b"] * 2, "hosts-2x2"),
                        (["a", "b", "c"] * 3, "hosts-3x3-flat"), (["a", "a", "b"], "generic-3")):
        assert derive_topology(place(hosts))[0].name == name


# ---------------------------------------------------------------------------------------------------------
# Engine level: tasp_attention on forked CPU ranks with emulated hosts

SEQ, B, H, HKV, D = 32, 1, 4, 2, 8


def _placed_worker(rank, n, hosts, seed):
    import torch.distributed as dist

    from megatron_tasp import tasp_attention, tasp_run_summary
    from megatron_tasp.engine.plan import build_rank_plan, resolve_topology
    from megatron_tasp.options import TaspOptions

    group = dist.group.WORLD
    opts = TaspOptions(hosts=tuple(hosts)) if hosts is not None else None
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(SEQ, B, h, D, generator=gen, dtype=torch.float64) for h in (H, HKV, HKV, H))
    idx = zigzag_index(SEQ, n, rank)
    ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
    out = tasp_attention(ql, kl, vl, group, options=opts)
    out.backward(do[idx])
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, True)
    ref.backward(do)
    err = max(rel_err(a, b[idx]) for a, b in zip((out.detach(), ql.grad, kl.grad, vl.grad),
                                                 (ref.detach(), qr.grad, kr.grad, vr.grad)))
    topo = resolve_topology(None, n)
    plan = build_rank_plan(group, topo, topo.max_rings(), "a2a", tuple(hosts) if hosts is not None else None)
    summary = tasp_run_summary(ql.detach(), kl.detach(), vl.detach(), group, options=opts)
    return err, plan.rings, summary["num_rings"]


@pytest.mark.parametrize("hosts,rings", [
    (["a", "b", "a", "b"], 2),  # 2 nodes x 2, strided: path-chained
    (["a", "a", "b", "b"], 2),  # 2 nodes x 2, blocked
    (["a", "b", "c", "d"], 2),  # one CP rank per node
    (["a", "a", "a", "b"], 2),  # uneven: generic
    (None, 2),  # gathered: every forked rank is on this host -> one node
])
def test_tasp_attention_is_exact_with_emulated_hosts(hosts, rings):
    n = 4
    per_rank = run_workers(_placed_worker, n, hosts, 5, timeout_s=240)
    for err, _, k in per_rank:
        assert err < 1e-10, err
        assert k == rings
    plan_rings = per_rank[0][1]
    assert all(r[1] == plan_rings for r in per_rank)
    verify_rings(n, plan_rings)
    if hosts is not None and len(set(hosts)) == 2 and hosts.count("a") == 2:
        assert inter_node_sends(plan_rings, hosts) == [1] * n


def test_build_rank_plan_replaces_the_generic_topology_and_caps_the_ring_count(monkeypatch, caplog):
    """No topology given (generic of the CP size, up to 7 rings at CP=8) but the hosts show 2 nodes x 4: the plan
    runs the 4 path-chained rings (capped, logged); a given multi-node topology is checked, not replaced."""
    import torch.distributed as dist

    from megatron_tasp.engine.plan import build_rank_plan

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    hosts = ("a", "b") * 4
    with caplog.at_level(logging.WARNING, logger="megatron_tasp.engine.plan"):
        plan = build_rank_plan(None, generic_topology(8), 7, "p2p", hosts)
    assert "num_rings 7 -> 4" in caplog.text
    assert plan.num_rings == 4 and plan.rank == 1 and plan.world_size == 8
    assert inter_node_sends(plan.rings, hosts) == [1] * 8
    assert [hosts[p] for p in plan.send_peers].count("a") == 1  # rank 1 (host b): one send leaves the node
    two = build_rank_plan(None, generic_topology(8), 2, "p2p", hosts)
    assert two.num_rings == 2
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 16)
    with pytest.raises(TaspConfigError, match="holds 6 CP ranks"):
        build_rank_plan(None, load_topology("h100-sxm-8x2"), 8, "p2p", ("a",) * 6 + ("b",) * 10)
