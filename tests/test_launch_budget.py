"""Host-cost guards: messages and tensor ops one TASP forward+backward issues (CPU, gloo, counted by a
dispatch mode).

Short sequences are bound by the host's launch cost (docs/PERFORMANCE.md), so the number of exchanges and
of non-view tensor ops per call is a performance property worth pinning: 3 (n - 1) exchanges per lane
(forward KV, backward KV, dK/dV hops) and, at CP=2 with one chunk, a fixed op budget measured on this
code (32-33 non-view ops including the torch fallback merge; 40 leaves room for torch version drift, not for
new work per step).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_tasp import tasp_attention
from megatron_tasp.testing.dist import run_workers

VIEW_OPS = {"slice", "permute", "select", "view", "alias", "detach", "unsqueeze", "squeeze", "expand",
            "as_strided", "transpose", "t", "_unsafe_view", "unbind", "split", "split_with_sizes", "narrow"}


def _count_worker(rank, n, chunks):
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q = torch.randn(24, 1, 4, 8, requires_grad=True)
    k, v = (torch.randn(24, 1, 2, 8, requires_grad=True) for _ in range(2))
    do = torch.randn(24, 1, 4, 8)
    for _ in range(2):  # plans, pieces and transports are built on the first calls
        tasp_attention(q, k, v, dist.group.WORLD, chunks=chunks).backward(do)
    mode = Count()
    with mode:
        tasp_attention(q, k, v, dist.group.WORLD, chunks=chunks).backward(do)
    return mode.ops


def _split(ops):
    c = Counter(op.split(".")[1] if op.startswith("aten.") else op for op in ops)
    exchanges = sum(v for name, v in c.items() if name.startswith("c10d."))
    compute = sum(v for name, v in c.items() if name not in VIEW_OPS and not name.startswith("c10d."))
    return exchanges, compute


@pytest.mark.parametrize("n,chunks", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_exchanges_per_call(n, chunks):
    per_rank = run_workers(_count_worker, n, chunks)
    for ops in per_rank:
        exchanges, _ = _split(ops)
        assert exchanges == 3 * (n - 1) * chunks


def test_cp2_op_budget():
    per_rank = run_workers(_count_worker, 2, 1)
    for ops in per_rank:
        _, compute = _split(ops)
        assert compute <= 40, sorted(Counter(ops).items())
