"""GPU tests of the own block's second stream (``megatron_tasp.engine.channel.fork`` / ``join``): work forked onto
it sees everything queued before on the current stream, the current stream sees the forked work after the join,
and nothing forks while a CUDA graph is being captured. ``torch.cuda._sleep`` delays the first stream's work so
that a missing wait would read stale values. Run with ``python -m pytest tests/gpu -q`` on a CUDA machine."""

from __future__ import annotations

import pytest
import torch

from megatron_tasp.engine.cache import PLAN_CACHE
from megatron_tasp.engine.channel import beside, fork, join

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_SPIN = 50_000_000  # cycles: tens of milliseconds


def _stream() -> torch.cuda.Stream:
    return PLAN_CACHE.streams.get(torch.device("cuda", torch.cuda.current_device()), "own block test")


def test_pool_streams_are_distinct():
    """The pool's streams never alias (torch hands out pool streams round-robin, 32 per priority)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    pool = type(PLAN_CACHE.streams)()
    handles = {pool.get(dev, i).cuda_stream for i in range(20)}
    assert len(handles) == 20


def test_forked_work_waits_for_the_current_stream_and_join_waits_for_it():
    """A forked stream sees what the current stream wrote before the fork; the current stream sees the forked
    work's result after the join."""
    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.zeros(1 << 20, device=dev)
    torch.cuda.synchronize()
    torch.cuda._sleep(_SPIN)  # the current stream is busy ...
    x.fill_(1.0)  # ... before it writes x
    aux = fork(dev, _stream())
    assert aux is not None and aux != torch.cuda.current_stream(dev)
    with beside(aux):
        t = x + 1.0  # read at once: without the fork's wait it would see the zeros
        torch.cuda._sleep(_SPIN)  # then the forked work is slow ...
        y = t * 2.0  # ... before it writes its result
    join(aux, (y,))
    z = y + 0.0  # read on the current stream after the join: without it, before y is written
    assert torch.all(z == 4.0)


def test_no_fork_while_capturing():
    """Inside a CUDA graph capture the own block runs in line."""
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.cuda.CUDAGraph()
    x = torch.ones(8, device=dev)
    seen = []
    with torch.cuda.graph(g):  # captures on a stream of its own
        seen.append(fork(dev, _stream()))
        y = x * 3
    g.replay()
    torch.cuda.synchronize()
    assert seen == [None] and torch.all(y == 3)
