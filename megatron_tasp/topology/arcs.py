"""What every ring construction shares (pure Python): the ring type, its error, the world-size bound and
the verification of orthogonal Hamiltonian rings. Kept apart so that the constructions
(:mod:`~megatron_tasp.topology.rings`, :mod:`~megatron_tasp.topology.even_rings`) import it and not each other."""

from __future__ import annotations

from collections.abc import Sequence

Ring = list[int]

# The largest CP group served: the full decomposition of K_256* takes ~0.3 s to build once and its schedule
# ~65K pieces; larger groups are far past any real CP size (an NVL72 domain is 72) and the even-n search
# grows quickly beyond it.
MAX_WORLD_SIZE = 256


class RingError(ValueError):
    """Raised for a ring request that cannot be served (the message names the fix)."""


def verify_rings(n: int, rings: Sequence[Sequence[int]]) -> None:
    """Raise RingError unless every ring is Hamiltonian on range(n) and no arc is used twice."""
    seen: set[tuple[int, int]] = set()
    for idx, ring in enumerate(rings):
        if sorted(ring) != list(range(n)):
            raise RingError(f"ring {idx} {list(ring)} is not a Hamiltonian cycle on ranks 0..{n - 1}")
        for j, u in enumerate(ring):
            arc = (u, ring[(j + 1) % n])
            if arc in seen:
                raise RingError(f"arc {arc[0]}->{arc[1]} is used by ring {idx} and by an earlier ring")
            seen.add(arc)


__all__ = ["MAX_WORLD_SIZE", "Ring", "RingError", "verify_rings"]
