"""Full decompositions of K_n* for even n: a shipped table (verified at load).

``even_rings_table.json`` is produced by ``scripts/gen_even_rings.py`` with
:func:`megatron_tasp.topology.ring_search.search_full_decomposition` and records the attempt
(temperature, seed) that produced each entry. Every entry is verified before it is returned, so a
damaged table fails loudly instead of yielding overlapping rings. Sizes outside the table get n-2 rings
(see :func:`megatron_tasp.topology.rings.max_rings`); the search takes minutes for n > 60, so it never
runs implicitly.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("even_rings_table.json")


@lru_cache(maxsize=1)
def _table() -> dict[str, list[list[int]]]:
    if not TABLE.exists():
        return {}
    return json.loads(TABLE.read_text())["rings"]


def table_sizes() -> list[int]:
    """Even n with a shipped decomposition."""
    return sorted(int(n) for n in _table())


def full_rings_even(n: int) -> list[list[int]]:
    """n-1 orthogonal directed Hamiltonian rings of K_n* for even n >= 8 (verified)."""
    from megatron_tasp.topology.rings import RingError, verify_rings

    if n % 2 or n < 8:
        raise RingError(f"full even decomposition needs an even n >= 8, got {n}")
    rings = _table().get(str(n))
    if rings is None:
        raise RingError(f"no full decomposition of K_{n}* is shipped (sizes: {table_sizes()}); add it with "
                        f"scripts/gen_even_rings.py --max-n {n}, or use num_rings <= {n - 2}")
    verify_rings(n, rings)
    if len(rings) != n - 1:
        raise RingError(f"ring table entry for n={n} has {len(rings)} rings, expected {n - 1}")
    return [list(r) for r in rings]
