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
        """Prove the schedule is exact; raise ScheduleError otherwise.

        Checks: every rank holds every (ring, source) piece exactly once over the n steps; what a rank
        receives at step t is what its peer held at step t and holds it at step t+1; each step a rank
        sends its k pieces to k distinct peers; every rank holds k pieces every step (equal work).
        """
        n, k = self.world_size, self.num_rings
        plans = [self.plan(r) for r in range(n)]
        recvs = [[set(st.recvs) for st in plans[r]] for r in range(n)]
        expected = sorted((i, s) for i in range(k) for s in range(n))
        for r in range(n):
            seen = [(h.ring, h.source) for st in plans[r] for h in st.held]
            if sorted(seen) != expected:
                raise ScheduleError(f"rank {r} does not hold every piece exactly once")
            for st in plans[r]:
                if len(st.held) != k:
                    raise ScheduleError(f"rank {r} step {st.step} holds {len(st.held)} pieces, expected {k}")
                if st.step > 0 and any(h.case == OWN for h in st.held):
                    raise ScheduleError(f"rank {r} holds its own piece again at step {st.step}")
                peers = {t.peer for t in st.sends}
                if len(peers) != len(st.sends) or r in peers:
                    raise ScheduleError(f"rank {r} step {st.step} sends twice to one peer or to itself")
                for tr in st.sends:
                    if Transfer(r, tr.ring) not in recvs[tr.peer][st.step]:
                        raise ScheduleError(f"rank {tr.peer} does not post the receive of ring {tr.ring} "
                                            f"from rank {r} at step {st.step}")
                    if plans[tr.peer][st.step + 1].held[tr.ring].source != st.held[tr.ring].source:
                        raise ScheduleError(f"piece of ring {tr.ring} from rank {r} arrives with the wrong source")

    def table(self, rank: int) -> list[dict]:
        """Rows for display: step, held pieces with source and case, sends and receives."""
        return [{"step": st.step,
                 "held": [(h.ring, h.source, h.case) for h in st.held],
                 "send_to": [(t.ring, t.peer) for t in st.sends],
                 "recv_from": [(t.ring, t.peer) for t in st.recvs]} for st in self.plan(rank)]


def compile_schedule(rings: Sequence[Sequence[int]], verify: bool = True) -> Schedule:
    """Build (and by default verify) the schedule of ``rings``."""
    sched = Schedule(rings)
    if verify:
        sched.verify()
    return sched


def split_sizes(length: int, parts: int) -> list[int]:
    """Split ``length`` into ``parts`` sizes differing by at most one (larger first)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    q, rem = divmod(length, parts)
    return [q + (1 if i < rem else 0) for i in range(parts)]
