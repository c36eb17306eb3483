"""Tests for the full decomposition of K_n* (even n >= 8) in megatron_tasp.topology.even_rings."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tasp.topology import even_rings
from megatron_tasp.topology.even_rings import even_full_rings

SIZES = list(range(8, 66, 2)) + [80, 100, 128]


def _check_decomposition(n: int, rings: list[list[int]]) -> None:
    """Independent check: n-1 Hamiltonian cycles on 0..n-1 that use every arc of K_n* exactly once."""
    assert len(rings) == n - 1
    arcs = []
    for ring in rings:
        assert sorted(ring) == list(range(n))
        arcs += [(ring[i], ring[(i + 1) % n]) for i in range(n)]
    assert len(arcs) == len(set(arcs)) == n * (n - 1)
    assert all(u != v for u, v in arcs)


@pytest.mark.parametrize("n", SIZES)
def test_full_decomposition(n: int) -> None:
    rings = even_full_rings(n)
    _check_decomposition(n, rings)
    assert all(ring[0] == 0 for ring in rings)


@pytest.mark.parametrize("n", [n for n in SIZES if n <= 64])
def test_each_size_up_to_64_is_fast(n: int) -> None:
    start = time.perf_counter()
    rings = even_rings._build(n)  # uncached construction + verification
    elapsed = time.perf_counter() - start
    _check_decomposition(n, rings)
    assert elapsed < 1.0, f"n={n} took {elapsed:.3f} s"


@pytest.mark.parametrize("n", [8, 26, 64, 128])
def test_deterministic_and_fresh_copies(n: int) -> None:
    first = even_full_rings(n)
    assert first == even_full_rings(n) == even_rings._build(n)
    first[0][0] = -1  # callers may mutate what they get back
    assert even_full_rings(n)[0][0] == 0


@pytest.mark.parametrize("n", [4, 6, 3, 5, 7, 9, 63, 65, 2, 1, 0, -8])
def test_rejects_sizes_without_decomposition(n: int) -> None:
    with pytest.raises(ValueError):
        even_full_rings(n)


@pytest.mark.parametrize("n", [8.0, "8", True, None])
def test_rejects_non_integers(n: object) -> None:
    with pytest.raises(ValueError):
        even_full_rings(n)  # type: ignore[arg-type]


def test_midpoint_paths_exist_except_small_exceptions() -> None:
    # The midpoint sub-problem has no solution for these k; the whole-problem search covers them.
    missing = [k for k in range(3, 70) if even_rings._midpoint_path(k) is None]
    assert missing == [4, 5, 6, 10, 11, 12]
    for k in (3, 7, 13, 31, 63):
        path = even_rings._midpoint_path(k)
        assert path is not None and path[0] == k - 1 and sorted(path) == list(range(1, k + 1))
        mids = []
        for x, y in zip(path, path[1:]):
            assert (y > x and (y - x) % 2 == 0) or (y < x and (x - y) % 2 == 1)
            mids.append((x + y) // 2)
        assert sorted(mids) == list(range(1, k))


@pytest.mark.parametrize("n", [10, 12, 14, 22, 24, 26, 8, 30])
def test_rainbow_path_uses_each_base_cycle_once(n: int) -> None:
    k = (n - 2) // 2
    base = even_rings._base_cycles(k)
    colour = {(c[i], c[(i + 1) % len(c)]): j for j, c in enumerate(base) for i in range(len(c))}
    assert len(colour) == (2 * k + 1) * 2 * k  # the base cycles decompose K_(n-1)*
    path = even_rings._rainbow_path(k, colour)
    assert path is not None and sorted(path) == list(range(2 * k + 1))
    assert sorted(colour[a] for a in zip(path, path[1:])) == list(range(2 * k))


def test_build_raises_runtime_error_without_rainbow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(even_rings, "_rainbow_path", lambda k, colour: None)
    with pytest.raises(RuntimeError):
        even_rings._build(10)


def test_verify_accepts_valid_and_rejects_broken_inputs() -> None:
    n = 10
    rings = even_full_rings(n)
    even_rings._verify(n, rings)
    with pytest.raises(RuntimeError):
        even_rings._verify(n, rings[:-1])  # a ring missing
    with pytest.raises(RuntimeError):
        even_rings._verify(n, [rings[0]] + rings[:-1])  # a ring repeated
    with pytest.raises(RuntimeError):
        even_rings._verify(n, [rings[0][:-1] + [rings[0][1]]] + rings[1:])  # not Hamiltonian
    with pytest.raises(RuntimeError):
        even_rings._verify(n, [r[:-1] for r in rings])  # too short


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from(SIZES), data=st.data())
def test_verify_rejects_any_swap_inside_a_ring(n: int, data: st.DataObject) -> None:
    rings = even_full_rings(n)
    r = data.draw(st.integers(0, n - 2), label="ring")
    i = data.draw(st.integers(0, n - 1), label="i")
    j = data.draw(st.integers(0, n - 1).filter(lambda x: x != i), label="j")
    broken = [list(ring) for ring in rings]
    broken[r][i], broken[r][j] = broken[r][j], broken[r][i]
    with pytest.raises(RuntimeError):
        even_rings._verify(n, broken)
