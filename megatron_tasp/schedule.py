"""Schedule compiler: from orthogonal rings to a per-rank, per-step plan (pure Python).

With k rings every rank splits its KV into k pieces; piece i travels only along ring i. At step t
(t = 0..n-1) rank r holds, for every ring i, the piece that started at ``pred_i^t(r)``. After computing
on it (t < n-1) rank r forwards piece i to ``succ_i(r)`` and receives piece i from ``pred_i(r)``.
The 1-ring schedule over ``[0, 1, ..., n-1]`` is ring attention.

Causal case of a held piece (Megatron's zigzag layout, rank r holds blocks r and 2n-1-r):
``own`` (step 0), ``earlier`` (source < r: all queries see the piece's front half) or ``later``
(source > r: only the back query block sees it, front and back halves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from megatron_tasp.topology.rings import RingError, verify_rings

OWN, EARLIER, LATER = "own", "earlier", "later"


class ScheduleError(RuntimeError):
    """A schedule failed verification."""


@dataclass(frozen=True)
class Held:
    """A KV piece a rank computes on during one step."""

    ring: int
    source: int
    case: str


@dataclass(frozen=True)
class Transfer:
    """One piece sent to / received from a peer at the end of a step."""

    peer: int
    ring: int


@dataclass(frozen=True)
class RankStep:
    """Everything one rank does in one step."""

    step: int
    held: tuple[Held, ...]
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]

    def rings_with(self, case: str) -> list[int]:
        """Ring indices of the pieces held in the given causal case."""
        return [h.ring for h in self.held if h.case == case]


class Schedule:
    """The TASP schedule for ``rings`` over ranks ``0..world_size-1``."""

    def __init__(self, rings: Sequence[Sequence[int]]):
        if not rings:
            raise RingError("a schedule needs at least one ring")
        n = len(rings[0])
        verify_rings(n, rings)
        self.world_size = n
        self.rings = [list(r) for r in rings]
        self.num_rings = len(self.rings)
        self.pos = [{v: j for j, v in enumerate(r)} for r in self.rings]

    def succ(self, ring: int, rank: int) -> int:
        """Next rank after ``rank`` on ``ring``."""
        r = self.rings[ring]
        return r[(self.pos[ring][rank] + 1) % self.world_size]

    def pred(self, ring: int, rank: int) -> int:
        """Previous rank before ``rank`` on ``ring``."""
        r = self.rings[ring]
        return r[(self.pos[ring][rank] - 1) % self.world_size]

    def source(self, ring: int, rank: int, step: int) -> int:
        """Rank where the piece of ``ring`` held by ``rank`` at ``step`` originated."""
        r = self.rings[ring]
        return r[(self.pos[ring][rank] - step) % self.world_size]

    def step(self, rank: int, step: int) -> RankStep:
        """The plan of ``rank`` at ``step``."""
        held = []
        for i in range(self.num_rings):
            s = self.source(i, rank, step)
            case = OWN if step == 0 else (EARLIER if s < rank else LATER)
            held.append(Held(i, s, case))
        last = step == self.world_size - 1
        sends = () if last else tuple(Transfer(self.succ(i, rank), i) for i in range(self.num_rings))
        recvs = () if last else tuple(Transfer(self.pred(i, rank), i) for i in range(self.num_rings))
        return RankStep(step, tuple(held), sends, recvs)

    def plan(self, rank: int) -> list[RankStep]:
        """All steps of ``rank``."""
        return [self.step(rank, t) for t in range(self.world_size)]

    def verify(self) -> None:
        """Prove the schedule is exact in O(n*k); raise ScheduleError otherwise.

        Properties proven for every rank r and step t: r holds every (ring, source) piece exactly once over
        the n steps; it holds k pieces each step (equal work); what it receives at the end of step t is what
        its ring predecessor held at step t, and it holds that piece at step t+1; each step it sends its k
        pieces to k distinct peers, never to itself.

        Why per (ring, rank) checks suffice: the piece of ring i that r holds at step t is the one from
        ``ring_i[pos_i(r) - t]``, so over t = 0..n-1 r sees each source of ring i once exactly when ring i is
        a permutation of the n ranks (checked); sends and receives do not depend on t, so checking
        ``pred_i(succ_i(r)) = r`` and that a forwarded piece keeps its source one step later
        (``pos_i(succ_i(r)) = pos_i(r) + 1``) once per (i, r) covers every step.
        """
        n, k = self.world_size, self.num_rings
        for i, ring in enumerate(self.rings):
            if len(ring) != n or len(self.pos[i]) != n or set(self.pos[i]) != set(range(n)):
                raise ScheduleError(f"ring {i} is not a permutation of ranks 0..{n - 1}")
        for r in range(n):
            succs = [self.succ(i, r) for i in range(k)]
            if len(set(succs)) != k or (n > 1 and r in succs):
                raise ScheduleError(f"rank {r} sends twice to one peer or to itself in one step")
            for i, peer in enumerate(succs):
                if self.pred(i, peer) != r:
                    raise ScheduleError(f"rank {peer} does not post the receive of ring {i} from rank {r}")
                if (self.pos[i][peer] - self.pos[i][r]) % n != 1 % n:
                    raise ScheduleError(f"piece of ring {i} from rank {r} arrives with the wrong source")

    def table(self, rank: int) -> list[dict]:
        """Rows for display: step, held pieces with source and case, sends and receives."""
        return [{"step": st.step,
                 "held": [(h.ring, h.source, h.case) for h in st.held],
                 "send_to": [(t.ring, t.peer) for t in st.sends],
                 "recv_from": [(t.ring, t.peer) for t in st.recvs]} for st in self.plan(rank)]


def compile_schedule(rings: Sequence[Sequence[int]], verify: bool = True) -> Schedule:
    """Build (and by default verify) the schedule of ``rings``; verified schedules are memoised per ring set
    (a schedule is immutable), so every later call for the same rings costs a dictionary lookup."""
    if not verify:
        return Schedule(rings)
    return _verified(tuple(tuple(r) for r in rings))


@lru_cache(maxsize=64)
def _verified(rings: tuple[tuple[int, ...], ...]) -> Schedule:
    sched = Schedule(rings)
    sched.verify()
    return sched


def split_sizes(length: int, parts: int) -> list[int]:
    """Split ``length`` into ``parts`` sizes differing by at most one (larger first)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    q, rem = divmod(length, parts)
    return [q + (1 if i < rem else 0) for i in range(parts)]
