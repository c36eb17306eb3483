"""Orthogonal directed Hamiltonian rings of the complete digraph K_n* (pure Python).

A *ring* is a directed Hamiltonian cycle, written as the list of ranks in visiting order; the arc
``ring[j] -> ring[j+1]`` (and ``ring[-1] -> ring[0]``) is used by that ring. Rings are *orthogonal* when
no arc appears in two of them. TASP splits each rank's KV block into one piece per ring and moves
piece i only along ring i, so k orthogonal rings drive k disjoint paths out of every rank at once.

Constructions:
- odd n: Walecki's decomposition of K_n into (n-1)/2 undirected Hamiltonian cycles; each cycle is
  used in both directions, giving n-1 rings (the maximum).
- even n: the patterned near-1-factorisation of K_n on Z_(n-1) + {inf}; consecutive factor pairs form
  (n-2)/2 Hamiltonian cycles, used in both directions -> n-2 rings (the maximum for n = 4 and 6). The
  full n-1 for even n >= 8 (Tillson's theorem) adds a vertex to the odd decomposition of K_(n-1)* along a
  rainbow Hamiltonian path: :mod:`megatron_tasp.topology.even_rings`.
- n = 2: the single ring 0 -> 1 -> 0 uses both arcs.

Ranks are relabelled so that ring 0 is always ``[0, 1, ..., n-1]`` (Megatron's ring order) and, in the
cycle-pair family, ring 1 is its reverse. ``num_rings=1`` is therefore plain ring attention.
Every result is verified before it is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from megatron_tasp.topology.arcs import MAX_WORLD_SIZE, Ring, RingError, verify_rings
from megatron_tasp.topology.even_rings import even_full_rings


def max_rings(n: int) -> int:
    """The largest number of orthogonal directed Hamiltonian rings of K_n* (Tillson: n-1 except 4, 6)."""
    if n < 2:
        raise RingError(f"world size must be >= 2 for rings, got {n}")
    if n > MAX_WORLD_SIZE:
        raise RingError(f"TASP serves CP groups of at most {MAX_WORLD_SIZE} ranks, got {n}: use a smaller "
                        "--context-parallel-size (or combine CP with TP/DP)")
    if n == 2:
        return 1
    if n == 4:
        return 2
    if n == 6:
        return 4
    return n - 1


def _walecki_odd(n: int) -> list[Ring]:
    """(n-1)/2 undirected Hamiltonian cycles of K_n, n odd (vertex n-1 is the hub)."""
    m2 = n - 1  # even number of rim vertices 0..n-2
    hub = n - 1
    cycles = []
    for i in range(m2 // 2):
        path = [i]
        for step in range(1, m2 // 2 + 1):
            path.append((i + step) % m2)
            if len(path) < m2:
                path.append((i - step) % m2)
        cycles.append([hub] + path[:m2])
    return cycles


def _factor_pairs_even(n: int) -> list[Ring]:
    """(n-2)/2 undirected Hamiltonian cycles of K_n, n even, from pairs of 1-factors of GK_n."""
    m = n - 1
    inf = m

    def factor(j: int) -> list[tuple[int, int]]:
        return [(inf, j % m)] + [((j - d) % m, (j + d) % m) for d in range(1, n // 2)]

    cycles = []
    for a in range(0, n - 2, 2):
        adj: dict[int, list[int]] = {v: [] for v in range(n)}
        for u, v in factor(a) + factor(a + 1):
            adj[u].append(v)
            adj[v].append(u)
        cyc, prev, cur = [0], -1, 0
        while True:
            nxt = adj[cur][0] if adj[cur][0] != prev else adj[cur][1]
            if nxt == 0:
                break
            cyc.append(nxt)
            prev, cur = cur, nxt
        if len(cyc) != n:  # pragma: no cover - guarded by verify_rings in tests for every n
            raise RingError(f"1-factor pair {a},{a + 1} of K_{n} is not Hamiltonian")
        cycles.append(cyc)
    return cycles


def _relabel(rings: list[Ring]) -> list[Ring]:
    """Relabel ranks so that ring 0 becomes 0 -> 1 -> ... -> n-1."""
    label = {v: i for i, v in enumerate(rings[0])}
    return [[label[v] for v in ring] for ring in rings]


@lru_cache(maxsize=256)
def _family(n: int, full: bool) -> tuple[tuple[int, ...], ...]:
    if n == 2:
        rings = [[0, 1]]
    elif full and n % 2 == 0 and n >= 8:
        rings = _relabel(even_full_rings(n))
    else:
        undirected = _walecki_odd(n) if n % 2 else _factor_pairs_even(n)
        rings = []
        for cyc in undirected:
            rings.append(cyc)
            rings.append([cyc[0]] + cyc[:0:-1])  # same cycle, other direction
        rings = _relabel(rings)
    verify_rings(n, rings)
    return tuple(tuple(r) for r in rings)


def hamiltonian_rings(n: int, num_rings: int | None = None) -> list[Ring]:
    """Return ``num_rings`` verified orthogonal directed Hamiltonian rings of K_n* (default: the maximum).

    Ring 0 is always ``[0, 1, ..., n-1]``. For k below the maximum the rings come in
    (cycle, reverse cycle) pairs, so k = 2 is the bidirectional ring.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise RingError(f"world size must be an integer >= 2, got {n!r}")
    top = max_rings(n)
    k = top if num_rings is None else num_rings
    if not isinstance(k, int) or k < 1:
        raise RingError(f"num_rings must be a positive integer, got {num_rings!r}")
    if k > top:
        why = " (K_4* and K_6* have no complete decomposition)" if n in (4, 6) else ""
        raise RingError(f"at most {top} orthogonal rings exist for world size {n}{why}; "
                        f"use --num-rings {top} or fewer")
    if k == 1:
        return [list(range(n))]
    full = k > _pair_family_size(n)
    return [list(r) for r in _family(n, full)[:k]]


def _pair_family_size(n: int) -> int:
    """How many rings the cycle/reverse-cycle family gives (n-1 odd, n-2 even)."""
    return 1 if n == 2 else (n - 1 if n % 2 else n - 2)


# ---------------------------------------------------------------------------------------------
# Multi-node: path-chained rings


def zigzag_path(g: int, start: int) -> list[int]:
    """Walecki zigzag Hamiltonian path on local GPUs 0..g-1: start, start+1, start-1, start+2, ..."""
    path = [start % g]
    step = 1
    while len(path) < g:
        path.append((start + step) % g)
        if len(path) < g:
            path.append((start - step) % g)
        step += 1
    return path


def multinode_rings(num_nodes: int, gpus_per_node: int, num_rings: int | None = None) -> list[Ring]:
    """Path-chained rings for ``num_nodes`` nodes of ``gpus_per_node`` GPUs (rank = node*g + local).

    Ring i walks zigzag path i through node 0, crosses to node 1, walks a path there, and so on,
    back to node 0. Odd-numbered nodes use the reversed path, so every inter-node hop joins the same
    local GPU index (same rail) when the node count is even. The g paths of one node use all
    g(g-1) intra-node arcs once, and every GPU sends exactly one piece across nodes per step.
    """
    u, g = num_nodes, gpus_per_node
    if u * g > MAX_WORLD_SIZE:
        raise RingError(f"TASP serves CP groups of at most {MAX_WORLD_SIZE} ranks, got {u} nodes x {g} GPUs")
    if u < 2:
        raise RingError(f"multi-node rings need at least 2 nodes, got {u}")
    if g < 2 or g % 2:
        raise RingError(f"multi-node rings need an even number of GPUs per node (>= 2), got {g}")
    k = g if num_rings is None else num_rings
    if not 1 <= k <= g:
        raise RingError(f"at most {g} path-chained rings exist for {g} GPUs per node; got num_rings={k}")
    half = g // 2
    order = [i for j in range(half) for i in (j, j + half)]  # path i+g/2 is path i reversed
    rings = []
    for i in order[:k]:
        ring: Ring = []
        for node in range(u):
            start = i if node % 2 == 0 else (i + half) % g
            ring.extend(node * g + local for local in zigzag_path(g, start))
        rings.append(ring)
    verify_rings(u * g, rings)
    return rings


def inter_node_arcs(ring: Sequence[int], gpus_per_node: int) -> list[tuple[int, int]]:
    """The arcs of ``ring`` that join two different nodes."""
    n = len(ring)
    return [(a, b) for a, b in ((ring[j], ring[(j + 1) % n]) for j in range(n))
            if a // gpus_per_node != b // gpus_per_node]
