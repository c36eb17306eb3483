"""Host-cost guards: messages and tensor ops one TASP forward+backward issues (CPU, gloo; ops counted by a
dispatch mode, messages at the transports).

Short sequences are bound by the host's launch cost (docs/PERFORMANCE.md), so the number of exchanges and
of non-view tensor ops per call is a performance property worth pinning: 3 (n - 1) messages per lane when
the backward exchanges KV again (forward KV, backward KV, dK/dV hops), 2 (n - 1) when it keeps the
forward's KV; at CP=2 with one chunk, a fixed op budget measured on this code (34-35 non-view ops with
exchanged KV, 31-32 with kept KV, the torch fallback merge included; the budgets leave room for torch
version drift, not for new work per step).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_tasp import tasp_attention
from megatron_tasp.launch import run_workers

VIEW_OPS = {"slice", "permute", "select", "view", "alias", "detach", "unsqueeze", "squeeze", "expand",
            "as_strided", "transpose", "t", "_unsafe_view", "unbind", "split", "split_with_sizes", "narrow"}


def _count_worker(rank, n, chunks, keep_kv=False):
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_tasp.engine import exchange

    posted = []
    for cls in exchange.TRANSPORTS.values():  # count messages at the transports (collectives may skip dispatch)
        def start(self, send, recv, label, _orig=cls.start):
            posted.append(label)
            return _orig(self, send, recv, label)
        cls.start = start

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
        tasp_attention(q, k, v, dist.group.WORLD, chunks=chunks, keep_kv=keep_kv).backward(do)
    mode = Count()
    posted.clear()
    with mode:
        tasp_attention(q, k, v, dist.group.WORLD, chunks=chunks, keep_kv=keep_kv).backward(do)
    return mode.ops, len(posted)


def _split(result):
    ops, exchanges = result
    c = Counter(op.split(".")[1] if op.startswith("aten.") else op for op in ops)
    compute = sum(v for name, v in c.items() if name not in VIEW_OPS and not name.startswith("c10d."))
    return exchanges, compute


@pytest.mark.parametrize("keep_kv", [False, True])
@pytest.mark.parametrize("n,chunks", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_exchanges_per_call(n, chunks, keep_kv):
    per_rank = run_workers(_count_worker, n, chunks, keep_kv)
    for ops in per_rank:
        exchanges, _ = _split(ops)
        assert exchanges == (2 if keep_kv else 3) * (n - 1) * chunks


@pytest.mark.parametrize("keep_kv,budget", [(False, 40), (True, 34)])
def test_cp2_op_budget(keep_kv, budget):
    per_rank = run_workers(_count_worker, 2, 1, keep_kv)
    for ops in per_rank:
        _, compute = _split(ops)
        assert compute <= budget, sorted(Counter(ops[0]).items())
