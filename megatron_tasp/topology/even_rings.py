"""Full decomposition of K_n* (n even, n >= 8) into n-1 arc-disjoint directed Hamiltonian rings.

Pure Python, no search tables. Tillson (1980) proved the decomposition exists for every even n >= 8
(and not for n = 4, 6). This module builds one by "adding a vertex to an odd decomposition".

Notation: n = 2k + 2, N = n - 1 = 2k + 1. The vertices of K_N* are Z_2k = {0, ..., 2k-1} and a hub I
(label 2k); the vertex that gets added is oo (label 2k + 1 = n - 1).

1. Odd part (1-rotational). b = (0, 1, -1, 2, -2, ..., k-1, -(k-1), k) is a sequencing of Z_2k: its
   2k - 1 consecutive differences 1, -2, 3, -4, ... are exactly the nonzero elements of Z_2k. So the 2k
   cycles C_j = (I, b_0 + j, b_1 + j, ..., b_(2k-1) + j), j in Z_2k, use every arc x -> y of Z_2k once
   (the arc with difference y - x sits at one position of b, and exactly one shift j puts it at x),
   I -> y once (j = y) and x -> I once (j = x - k). They decompose K_N*; call j the colour of an arc.
   (These are Walecki's cycles, each in both directions.)

2. Adding oo. Let Q be a Hamiltonian path of K_N* that uses exactly one arc of every colour (a
   "rainbow" path: 2k arcs, 2k colours). For every j, replace the arc u -> v of C_j that lies on Q by
   u -> oo -> v; add the ring E = (oo, Q). The arcs taken out of the C_j are exactly the arcs of Q, now
   in E. oo leaves towards every head of a Q-arc (all vertices but Q's first) and towards Q's first
   vertex in E, and is entered from every tail (all but Q's last) and from Q's last in E: every arc at
   oo once. So the 2k + 1 = n - 1 rings decompose K_n*.

3. The rainbow path. A short computation gives the colour of x -> y in Z_2k as x + (d - 1)/2 for odd
   d = (y - x) mod 2k, x + d/2 + k for even d; I -> y has colour y and x -> I colour x + k. Take
       Q = I, 0, 2k-1, 2k-2, ..., k+1, then a path P through {1, ..., k} that starts at k - 1.
   The prefix has colours 0, k-1, k-2, ..., 1 and the step k+1 -> k-1 colour k. Inside {1, ..., k} an
   up-step by an even amount or a down-step by an odd amount x -> y has colour floor((x+y)/2) + k (the
   other two kinds would repeat colours < k), so P needs the k - 1 values floor((x+y)/2) of its steps to
   be exactly 1, ..., k-1. This "midpoint path" problem is tiny and very constrained (value 1 only from
   2 -> 1, value k-1 only from k-2 -> k, ...); a deterministic exact-cover search that always extends
   the most constrained value finds it in well under a millisecond per k for k <= 64 (checked for every
   k <= 130). It has no solution for k in {4, 5, 6, 10, 11, 12}; for those (n = 10, 12, 14, 22, 24, 26)
   the same search runs on the whole rainbow-path problem instead, which is small there.

Why not a purely cyclic (rotational) construction: for n = 0 mod 4 a parity count shows that rings
invariant under Z_n, or under Z_(n/2) acting on two halves, cannot do it, and Z_(n-1) with a fixed
point needs a sequencing of the odd-order group Z_(n-1), which does not exist. The vertex-adding step
above breaks the symmetry in one place only.

The output is checked by :func:`_verify` before it is returned; a failed check raises RuntimeError.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from megatron_tasp.topology.arcs import RingError, verify_rings

__all__ = ["even_full_rings"]

# Search budgets (nodes). The largest need seen for k <= 130 is ~35k (midpoint) and ~60 (whole problem,
# exceptional k); the budgets only bound the time of a failure, which then raises RuntimeError.
_MIDPOINT_BUDGET = 300_000
_RAINBOW_BUDGET = 300_000


def even_full_rings(n: int) -> list[list[int]]:
    """Return n-1 arc-disjoint directed Hamiltonian cycles of K_n* (vertices 0..n-1), even n >= 8.

    Each cycle is a list of the n vertices in visiting order (it closes from the last back to the
    first) and starts at vertex 0; together the cycles use each of the n(n-1) arcs exactly once.
    Deterministic. Raises ValueError for odd n or n < 8 (no decomposition exists for n = 4, 6).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be an int, got {n!r}")
    if n < 8 or n % 2:
        raise ValueError(f"even_full_rings needs an even n >= 8 (K_4* and K_6* have no decomposition), got {n}")
    return [list(ring) for ring in _cached_rings(n)]


@lru_cache(maxsize=64)
def _cached_rings(n: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(ring) for ring in _build(n))


def _build(n: int) -> list[list[int]]:
    """Construct and verify the decomposition (no caching)."""
    k = (n - 2) // 2
    extra = 2 * k + 1  # the added vertex oo; the hub I of the odd part is 2k = n - 2
    base = _base_cycles(k)
    colour = {(c[i], c[(i + 1) % len(c)]): j for j, c in enumerate(base) for i in range(len(c))}
    path = _rainbow_path(k, colour)
    if path is None:
        raise RuntimeError(f"no rainbow Hamiltonian path found for n={n} (search budget exhausted)")
    arc_of = {colour[(u, v)]: (u, v) for u, v in zip(path, path[1:])}
    if sorted(path) != list(range(2 * k + 1)) or sorted(arc_of) != list(range(2 * k)):
        raise RuntimeError(f"internal error: path for n={n} is not a rainbow Hamiltonian path")
    rings = []
    for j, cyc in enumerate(base):
        u, v = arc_of[j]
        i = cyc.index(u)
        if cyc[(i + 1) % len(cyc)] != v:
            raise RuntimeError(f"internal error: arc {u}->{v} is not on base cycle {j} (n={n})")
        rings.append(cyc[: i + 1] + [extra] + cyc[i + 1:])
    rings.append([extra] + path)
    rings = [_rotate_to_zero(r) for r in rings]
    _verify(n, rings)
    return rings


def _base_cycles(k: int) -> list[list[int]]:
    """The 2k rings C_j = (I, b + j) of K_(2k+1)*, b the zigzag sequencing of Z_2k, I = 2k."""
    m = 2 * k
    seq = [0]
    for t in range(1, m):
        seq.append((t + 1) // 2 if t % 2 else (-(t // 2)) % m)
    return [[m] + [(x + j) % m for x in seq] for j in range(m)]


def _rainbow_path(k: int, colour: dict[tuple[int, int], int]) -> list[int] | None:
    """A Hamiltonian path of K_(2k+1)* with one arc of each colour 0..2k-1 (see the module docstring)."""
    tail = _midpoint_path(k)
    if tail is not None:
        return [2 * k, 0] + list(range(2 * k - 1, k, -1)) + tail
    options: list[list[tuple[int, int]]] = [[] for _ in range(2 * k)]
    for (u, v), c in sorted(colour.items()):
        options[c].append((u, v))
    return _exact_cover_path(2 * k + 1, options, start=None, budget=_RAINBOW_BUDGET)


def _midpoint_path(k: int) -> list[int] | None:
    """Path through 1..k from k-1 whose steps (up by even / down by odd) have floor-midpoints 1..k-1."""
    start = k - 1
    options: list[list[tuple[int, int]]] = []
    for c in range(1, k):
        opts = [(x, 2 * c - x) for x in range(max(1, 2 * c - k), c) if 2 * c - x != start]
        opts += [(2 * c + 1 - y, y) for y in range(max(1, 2 * c + 1 - k), c + 1) if y != start]
        options.append(opts)
    return _exact_cover_path(k + 1, options, start=start, budget=_MIDPOINT_BUDGET)


def _exact_cover_path(num_vertices: int, options: Sequence[Sequence[tuple[int, int]]], start: int | None,
                      budget: int) -> list[int] | None:
    """Pick one arc from every option list so that the arcs form one path; None if none is found.

    Vertices are 0..num_vertices-1 (unused labels simply stay isolated). Arcs are added one option list
    at a time, always the list with the fewest arcs still usable (tail without successor, head without
    predecessor, no cycle); the search backtracks and gives up after ``budget`` nodes.
    """
    has_out = [False] * num_vertices
    has_in = [False] * num_vertices
    first = list(range(num_vertices))  # first[v]: start of the chain that ends at v (valid at chain ends)
    last = list(range(num_vertices))  # last[v]: end of the chain that starts at v (valid at chain starts)
    chosen: list[tuple[int, int] | None] = [None] * len(options)
    remaining = list(range(len(options)))
    nodes = 0

    def usable(arc: tuple[int, int]) -> bool:
        x, y = arc
        return not has_out[x] and not has_in[y] and first[x] != y

    def search() -> bool:
        nonlocal nodes
        nodes += 1
        if nodes > budget:
            return False
        if not remaining:
            return True
        best, best_arcs = -1, None
        for c in remaining:
            arcs = [a for a in options[c] if usable(a)]
            if best_arcs is None or len(arcs) < len(best_arcs):
                best, best_arcs = c, arcs
                if len(arcs) <= 1:
                    break
        if not best_arcs:
            return False
        remaining.remove(best)
        for x, y in best_arcs:
            fx, ly = first[x], last[y]
            has_out[x] = has_in[y] = True
            last[fx], first[ly] = ly, fx
            chosen[best] = (x, y)
            if search():
                return True
            last[fx], first[ly] = x, y
            has_out[x] = has_in[y] = False
            chosen[best] = None
            if nodes > budget:
                break
        remaining.append(best)
        remaining.sort()
        return False

    if not search():
        return None
    succ = dict(arc for arc in chosen if arc is not None)
    heads = set(succ.values())
    begin = [v for v in succ if v not in heads]
    if len(begin) != 1 or (start is not None and begin[0] != start):
        return None
    path = [begin[0]]
    while path[-1] in succ:
        path.append(succ[path[-1]])
    return path


def _rotate_to_zero(ring: list[int]) -> list[int]:
    i = ring.index(0)
    return ring[i:] + ring[:i]


def _verify(n: int, cycles: Sequence[Sequence[int]]) -> None:
    """Raise RuntimeError unless ``cycles`` are n-1 Hamiltonian cycles using every arc of K_n* once."""
    if len(cycles) != n - 1:
        raise RuntimeError(f"expected {n - 1} rings for n={n}, got {len(cycles)}")
    try:  # n-1 arc-disjoint Hamiltonian cycles cover all n(n-1) arcs
        verify_rings(n, cycles)
    except RingError as exc:
        raise RuntimeError(f"internal error building rings for n={n}: {exc}") from None
