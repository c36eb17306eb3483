"""megatron-tasp bench pieces that need no GPU: the kernel_bound block work, the TASP variants and flags."""

from __future__ import annotations

import argparse

import pytest

from megatron_tasp.apps.bench import tasp_flags
from megatron_tasp.apps.bench.impls import tasp_variants
from megatron_tasp.apps.bench.kernel_bound import Block, block_work
from megatron_tasp.costmodel.records import attention_flops
from megatron_tasp.options import TaspOptionError, TaspOptions


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_bound_does_each_ranks_share_of_the_flops(n, causal):
    tokens, b, h, d = 64, 1, 2, 8
    share = attention_flops(tokens * n, b, h, d, causal, "fwd") / n
    for rank in range(n):
        blocks = block_work(tokens, n, rank, causal)
        assert len(blocks) == n
        area = sum(blk.q_len * blk.kv_len * (0.5 if blk.causal else 1.0) for blk in blocks)
        assert 4.0 * b * h * d * area == share
        assert all(0 <= blk.q_start and blk.q_start + blk.q_len <= tokens and blk.kv_len <= tokens for blk in blocks)


def test_kernel_bound_at_cp2_causal_is_one_causal_and_one_half_block():
    assert block_work(16, 2, 0, True) == [Block(0, 16, 16, True), Block(8, 8, 16, False)]
    assert block_work(16, 2, 1, True) == [Block(0, 16, 16, True), Block(0, 16, 8, False)]
    assert block_work(16, 3, 1, False) == [Block(0, 16, 16, False)] * 3


def _cfg(**kw):
    args = argparse.Namespace(kernel=None, num_rings="", transports="a2a,symm", chunks="1,auto", keep_kv="auto,1",
                              impls=["tasp", "compute_only"])
    for k, v in kw.items():
        setattr(args, k, v)
    tasp_flags(args)
    return args


def test_variants_are_options_objects_and_skip_what_options_refuse():
    cfg = _cfg()
    assert cfg.num_rings is None and cfg.transports == ["a2a", "symm"] and cfg.chunks == [1, "auto"]
    vs = tasp_variants(cfg, 4)
    tasp = [o for impl, o, _ in vs if impl == "tasp"]
    assert all(isinstance(o, TaspOptions) for o in tasp)
    assert not any(o.transport == "symm" and o.keep_kv is True for o in tasp)  # TaspOptions refuses it
    assert {o.num_rings for o in tasp} == {1, 2}  # 1 and the most rings 4 ranks build
    co = [(o, t) for impl, o, t in vs if impl == "compute_only"]
    assert co and all(t == "none" and o.num_rings == 2 for o, t in co)
    assert tasp_variants(cfg, 1) == []


@pytest.mark.parametrize("flags,needle", [({"num_rings": "0"}, "num_rings"), ({"transports": "x"}, "transport"),
                                          ({"chunks": "-1"}, "chunks"), ({"keep_kv": "sometimes"}, "keep_kv"),
                                          ({"kernel": 3}, "kernel")])
def test_flags_fail_with_the_options_message(flags, needle):
    with pytest.raises(TaspOptionError, match=needle):
        _cfg(**flags)


def test_time_back_to_back_counts_every_call():
    """Back-to-back timing runs warmup + rounds x iters calls and reports the time per call (CPU clock here)."""
    import time

    import torch

    from megatron_tasp.apps.bench.timing import time_back_to_back

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ms = time_back_to_back(fn, torch.device("cpu"), warmup=2, iters=5, rounds=3)
    assert len(calls) == 2 + 5 * 3
    assert 2.0 <= ms < 50.0
    with pytest.raises(ValueError, match="iters"):
        time_back_to_back(fn, torch.device("cpu"), warmup=0, iters=0)
