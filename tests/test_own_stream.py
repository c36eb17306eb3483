"""The own block of a CP=2 packed-documents call runs on a stream of its own, beside the remote block
(``engine.channel.fork`` / ``beside`` / ``join``). There are no streams on CPU, so a token stands in for the stream
and the engine's order of events is logged: the own block is queued on it first, the remote block then on the
current stream, and nothing reads the own block's results (merge, sums) before the join. The overlap itself, and
its speed, are measured on the GPU (``scripts/gpu_thd_rank_probe.py``, ``scripts/gpu_check_thd.py``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import megatron_tasp.engine.backward as engine_backward
import megatron_tasp.engine.forward as engine_forward
from megatron_tasp.engine.channel import beside, fork, join
from megatron_tasp.kernels.segmented import SegmentedBlock
from megatron_tasp.launch import run_workers
from tests.test_thd import TOL, boundaries, run_case


def test_fork_join_and_beside_do_nothing_off_cuda():
    assert fork(torch.device("cpu"), None) is None
    assert fork(torch.device("cpu"), "a stream") is None  # no streams on CPU, whatever the call holds
    join(None, [torch.zeros(2), (torch.ones(1),)])
    with beside(None):
        x = torch.ones(3) * 2
    assert x.sum() == 6


def _order_worker(rank: int, n: int, causal: bool, keep_kv: bool) -> tuple[list[str], float]:
    """This forked rank's log of one packed CP=2 forward+backward with a stand-in own-block stream."""
    import torch.distributed as dist

    log: list[str] = []
    token = object()

    def fake_fork(device, stream):
        log.append("fork")
        return token

    @contextlib.contextmanager
    def fake_beside(stream):
        if stream is not None:
            assert stream is token
            log.append("beside(")
        yield
        if stream is not None:
            log.append(")")

    def fake_join(stream, results):
        if stream is not None:
            assert stream is token
            assert any(isinstance(x, torch.Tensor) for x in results), "join must name the own block's results"
            log.append("join")

    def logged(name, fn):
        def wrapper(*args, **kwargs):
            log.append(name)
            return fn(*args, **kwargs)
        return wrapper

    # this forked worker's modules only
    for mod in (engine_forward, engine_backward):
        mod.fork, mod.beside, mod.join = fake_fork, fake_beside, fake_join
    engine_forward.merge_to = logged("merge", engine_forward.merge_to)
    engine_backward.home_sum = logged("sum", engine_backward.home_sum)
    engine_backward.Grads.finish_dq = logged("dq", engine_backward.Grads.finish_dq)  # adds into the own dQ
    SegmentedBlock.forward_unchecked = logged("fwd", SegmentedBlock.forward_unchecked)
    SegmentedBlock.backward_unchecked = logged("bwd", SegmentedBlock.backward_unchecked)
    cu_pad, cu = boundaries([9, 16, 3, 24], n)
    err = run_case(dist.group.WORLD, cu_pad, cu, causal, 2, keep_kv=keep_kv)
    return log, err


@pytest.mark.parametrize("keep_kv", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_own_block_is_queued_first_and_read_only_after_the_join(causal, keep_kv):
    for log, err in run_workers(_order_worker, 2, causal, keep_kv, timeout_s=120):
        assert err <= TOL, err
        second = log.index("fork", 1)  # the backward's
        fwd_part, bwd_part = log[:second], log[second:]
        # forward: the own block on its stream, then the remote block, and the merge only after the join
        assert fwd_part == ["fork", "beside(", "fwd", ")", "fwd", "join", "merge"], log
        # backward: the same, and the dQ and dK/dV sums only after the join
        assert bwd_part == ["fork", "beside(", "bwd", ")", "bwd", "join", "dq", "sum"], log
