"""Property tests of the ring decompositions and the schedule compiler (pure Python)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tasp.schedule import EARLIER, LATER, OWN, ScheduleError, Transfer, compile_schedule
from megatron_tasp.topology import (
    MAX_WORLD_SIZE,
    RingError,
    hamiltonian_rings,
    inter_node_arcs,
    max_rings,
    multinode_rings,
    verify_rings,
)


def test_max_rings_table():
    assert [max_rings(n) for n in range(2, 11)] == [1, 2, 2, 4, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("n", range(2, 65))
def test_maximal_decomposition_every_n(n):
    t0 = time.perf_counter()
    rings = hamiltonian_rings(n)
    assert time.perf_counter() - t0 < 1.0
    assert len(rings) == max_rings(n)
    verify_rings(n, rings)  # raises on any repeated arc or non-Hamiltonian ring
    arcs = {(r[j], r[(j + 1) % n]) for r in rings for j in range(n)}
    assert len(arcs) == n * len(rings)
    if n not in (4, 6) and n > 2:
        assert len(arcs) == n * (n - 1)  # every arc of K_n* used: full decomposition
    assert rings[0] == list(range(n))  # ring 0 is Megatron's ring order


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.data())
def test_any_ring_count_gives_exact_schedule(n, data):
    k = data.draw(st.integers(1, max_rings(n)))
    rings = hamiltonian_rings(n, k)
    assert len(rings) == k
    sched = compile_schedule(rings)  # verify() proves exactly-once delivery
    rank = data.draw(st.integers(0, n - 1))
    plan = sched.plan(rank)
    assert all(len(step.held) == k for step in plan)
    assert all(h.case == OWN for h in plan[0].held)
    for step in plan[1:]:
        for h in step.held:
            assert h.case == (EARLIER if h.source < rank else LATER)
    # per step, the k sends go to k distinct peers
    for step in plan[:-1]:
        assert len({t.peer for t in step.sends}) == k


def test_one_ring_is_ring_attention():
    sched = compile_schedule(hamiltonian_rings(6, 1))
    for r in range(6):
        for step in sched.plan(r):
            assert [h.source for h in step.held] == [(r - step.step) % 6]


def test_two_rings_are_bidirectional():
    for n in (3, 4, 5, 8, 9):
        a, b = hamiltonian_rings(n, 2)
        assert b == [a[0]] + a[:0:-1]


@pytest.mark.parametrize("n,k", [(2, 2), (4, 3), (6, 5), (1, None), (5, 0)])
def test_impossible_requests_raise(n, k):
    with pytest.raises(RingError):
        hamiltonian_rings(n, k)


def test_verify_catches_bad_rings():
    with pytest.raises(RingError):
        verify_rings(4, [[0, 1, 2, 3], [0, 1, 3, 2]])  # arc 0->1 twice
    with pytest.raises(RingError):
        verify_rings(4, [[0, 1, 2, 2]])


def _exhaustive_schedule_check(sched) -> None:
    """Oracle: walk every rank's plan step by step (O(n^2 k)) and check what verify() proves in O(n k)."""
    n, k = sched.world_size, sched.num_rings
    plans = [sched.plan(r) for r in range(n)]
    expected = sorted((i, s) for i in range(k) for s in range(n))
    for r in range(n):
        assert sorted((h.ring, h.source) for st_ in plans[r] for h in st_.held) == expected
        for st_ in plans[r]:
            assert len(st_.held) == k
            assert st_.step == 0 or all(h.case != "own" for h in st_.held)
            peers = [t.peer for t in st_.sends]
            assert len(set(peers)) == len(peers) and r not in peers
            for tr in st_.sends:
                assert Transfer(r, tr.ring) in plans[tr.peer][st_.step].recvs
                assert plans[tr.peer][st_.step + 1].held[tr.ring].source == st_.held[tr.ring].source


@pytest.mark.parametrize("n", range(2, 11))
def test_linear_verify_agrees_with_the_exhaustive_walk(n):
    for k in range(1, max_rings(n) + 1):
        sched = compile_schedule(hamiltonian_rings(n, k))
        _exhaustive_schedule_check(sched)


def test_schedule_verify_catches_tampering():
    sched = compile_schedule(hamiltonian_rings(5, 2), verify=False)
    ring = list(sched.rings[1])
    ring[1], ring[2] = ring[2], ring[1]  # still Hamiltonian, but now shares arcs with ring 0
    sched.rings[1] = ring
    sched.pos[1] = {v: j for j, v in enumerate(ring)}
    with pytest.raises(ScheduleError):
        sched.verify()
    sched = compile_schedule(hamiltonian_rings(5, 2), verify=False)
    sched.pos[1] = {v: (j + 1) % 5 if j < 2 else j for j, v in enumerate(sched.rings[1])}  # positions disagree
    with pytest.raises(ScheduleError):
        sched.verify()


def test_first_plan_at_cp72_is_cheap():
    """The gb200-nvl72 preset's full ring set, schedule and one rank's plan: well under the engine's budget."""
    import time

    from megatron_tasp.topology import load_topology

    topo = load_topology("gb200-nvl72")
    t0 = time.perf_counter()
    sched = compile_schedule(topo.rings(topo.max_rings()))
    sched.plan(71)
    assert time.perf_counter() - t0 < 2.0  # measured ~0.05 s on 2 CPU cores; generous for slow CI machines


def test_world_size_bound_is_one_line_error():
    for k in (None, 1):
        with pytest.raises(RingError, match=f"at most {MAX_WORLD_SIZE} ranks"):
            hamiltonian_rings(MAX_WORLD_SIZE + 1, k)
    with pytest.raises(RingError, match=f"at most {MAX_WORLD_SIZE} ranks"):
        max_rings(10**5)
    assert len(hamiltonian_rings(MAX_WORLD_SIZE)) == MAX_WORLD_SIZE - 1


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.sampled_from([2, 4, 6, 8]), st.data())
def test_multinode_one_inter_node_send_per_gpu_per_step(u, g, data):
    k = data.draw(st.integers(1, g))
    rings = multinode_rings(u, g, k)
    n = u * g
    verify_rings(n, rings)
    compile_schedule(rings)
    if k == g:
        sends = [a for r in rings for a in inter_node_arcs(r, g)]
        assert sorted(s for s, _ in sends) == list(range(n))  # each GPU sends across nodes exactly once
        assert sorted(d for _, d in sends) == list(range(n))  # and receives exactly once
        intra = [(r[j], r[(j + 1) % n]) for r in rings for j in range(n)
                 if r[j] // g == r[(j + 1) % n] // g]
        assert len(intra) == len(set(intra)) == u * g * (g - 1)  # all intra-node arcs, once
    if u % 2 == 0:  # rail-aligned: inter-node hops join the same local GPU
        assert all(a % g == b % g for r in rings for a, b in inter_node_arcs(r, g))


def test_multinode_rejects_bad_shapes():
    with pytest.raises(RingError):
        multinode_rings(1, 8)
    with pytest.raises(RingError):
        multinode_rings(2, 3)
    with pytest.raises(RingError):
        multinode_rings(2, 4, 5)
