"""The one-launch varlen block (megatron_tasp.kernels.varlen) on CPU with a float64 reference of the varlen
ops swapped in: it equals the per-document segmented block (forward, lse, backward from merged out/lse) and,
forced into the engine, packed-document attention stays exact for CP 2 and 3. The real flash op is checked on
GPU by scripts/gpu_check_thd.py."""

from __future__ import annotations

import pytest
import torch

import megatron_tasp.engine.thd as engine_thd
from megatron_tasp.kernels import get_kernel
from megatron_tasp.kernels import varlen as varlen_mod
from megatron_tasp.kernels.segmented import segmented_block
from megatron_tasp.kernels.varlen import VarlenBlock
from megatron_tasp.launch import run_workers
from tests import varlen_reference
from tests.test_thd import TOL, _sequence_case, boundaries, mixes, run_case

CPU = torch.device("cpu")


@pytest.fixture
def reference_ops(monkeypatch):
    monkeypatch.setitem(varlen_mod.VARLEN_OPS, "ops", varlen_reference.REFERENCE_OPS)
    varlen_reference.CALLS.update(forward=0, backward=0)


def _pair(seg_q, seg_k, big_rows=None):
    kern = get_kernel("math", "cpu", torch.float32, 8)
    seg = segmented_block(kern, seg_q, seg_k, CPU)
    return seg, VarlenBlock(seg, CPU, big_rows=big_rows)


@pytest.mark.parametrize("big_rows", [None, 5, 100])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_block_equals_the_segmented_block(reference_ops, causal, big_rows):
    """All segments in one varlen launch (big_rows None, or none that large), or the large ones (>= 5 rows on
    both sides) on the dense kernel and the rest in one launch."""
    gen = torch.Generator().manual_seed(3)
    seg_q = torch.tensor([0] * 5 + [1] * 3 + [3] * 4 + [0] * 2 + [1] * 6 + [5] * 4)
    seg_k = seg_q.clone() if causal else torch.tensor([1] * 7 + [0] * 4 + [4] * 5 + [3] * 3)
    q = torch.randn(1, 4, len(seg_q), 8, generator=gen)
    k, v = (torch.randn(1, 2, len(seg_k), 8, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)
    seg, var = _pair(seg_q, seg_k, big_rows)
    assert (var.big is not None) == (big_rows == 5) and var.small
    o1, l1, c1 = seg.forward_unchecked(q, k, v, causal=causal, scale=0.3)
    o2, l2, c2 = var.forward_unchecked(q, k, v, causal=causal, scale=0.3)
    assert varlen_reference.CALLS["forward"] == 1, "one launch for the whole block"
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.isinf(l1), torch.isinf(l2)) and l2.is_contiguous() and l2.dtype == torch.float32
    torch.testing.assert_close(l2[torch.isfinite(l2)], l1[torch.isfinite(l1)], rtol=1e-5, atol=1e-6)
    # the backward takes the MERGED out/lse: perturb them as a merge with another block would
    out_m, lse_m = o1 * 0.7, torch.where(torch.isfinite(l1), l1 + 0.25, l1)
    g1 = seg.backward_unchecked(dout, q, k, v, out_m, lse_m, c1, causal=causal, scale=0.3)
    g2 = var.backward_unchecked(dout, q, k, v, out_m, lse_m, c2, causal=causal, scale=0.3)
    assert varlen_reference.CALLS["backward"] == 1
    for a, b in zip(g2, g1):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_contiguous_rows_are_views_and_other_inputs_fall_back(reference_ops):
    seg_q = torch.tensor([2] * 3 + [0] * 4 + [1] * 5)  # rows of each shared segment in one ascending run
    seg_k = torch.tensor([0] * 2 + [1] * 2 + [2] * 3)  # gathered in query order: rows 4.., 0.., 2..
    seg, var = _pair(seg_q, seg_k)
    assert isinstance(var.q_index, slice) and var.q_index == slice(0, 12)
    assert not isinstance(var.k_index, slice)
    assert var.cu_q.tolist() == [0, 3, 7, 12] and var.cu_k.tolist() == [0, 3, 5, 7] and var.max_q == 5
    assert var.k_index.tolist() == [4, 5, 6, 0, 1, 2, 3]
    q = torch.randn(2, 2, 12, 8)  # batch 2: the varlen op packs one sequence; the block falls back
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    o, _, ctx = var.forward_unchecked(q, k, v, causal=False, scale=0.5)
    assert varlen_reference.CALLS["forward"] == 0 and not (isinstance(ctx, tuple) and ctx[0] == "varlen")
    torch.testing.assert_close(o, seg.forward_unchecked(q, k, v, causal=False, scale=0.5)[0])


def test_the_real_op_declines_cpu_tensors():
    q = torch.randn(1, 2, 4, 8)
    assert "CUDA" in varlen_mod.varlen_reason(q, q)


def _engine_worker(rank, n):
    import torch.distributed as dist

    errs = {}
    for name, lengths in mixes(n, 5).items():
        cu_pad, cu = boundaries(lengths, n)
        for causal in (True, False):
            for hkv, kw in ((4, {"num_rings": 1}), (1, {"transport": "p2p"}), (2, {"chunks": 2, "keep_kv": False})):
                errs[(name, causal, hkv, tuple(kw))] = run_case(dist.group.WORLD, cu_pad, cu, causal, hkv, **kw)
    return errs, varlen_reference.CALLS["forward"]


@pytest.mark.parametrize("n", [2, 3])
def test_engine_through_the_varlen_block_is_exact(reference_ops, monkeypatch, n):
    """n=2: every block in one varlen launch; n=3: segments of >= 3 rows on the dense kernel, the rest varlen."""
    monkeypatch.setattr(engine_thd, "_use_varlen", lambda kernel, device: True)
    if n == 3:
        for name in ("cpu", "math"):
            monkeypatch.setitem(varlen_mod.DENSE_SEGMENT_ROWS, name, 3)
    for errs, launches in run_workers(_engine_worker, n, timeout_s=300):
        bad = {k: e for k, e in errs.items() if not e <= TOL}
        assert not bad, bad
        assert launches > 0, "the varlen block must have run"


def _sequence_worker(rank, n):
    import torch.distributed as dist

    total = 2 * n * 9
    mixes_ = {"tiny": [3] * (total // 3),  # documents shorter than a chunk: blocks without a shared document
              "crossing": [5, 1, total - 6 - 7, 7]}
    errs = {}
    for name, lengths in mixes_.items():
        for causal in (True, False):
            errs[(name, causal)] = _sequence_case(dist.group.WORLD, lengths, causal, 2)
    return errs, varlen_reference.CALLS["forward"]


@pytest.mark.parametrize("n", [2, 3])
def test_sequence_split_through_the_varlen_block_is_exact(reference_ops, monkeypatch, n):
    """packed_split='sequence' with every block on the varlen path, incl. blocks that share no document."""
    monkeypatch.setattr(engine_thd, "_use_varlen", lambda kernel, device: True)
    for errs, launches in run_workers(_sequence_worker, n, timeout_s=300):
        bad = {k: e for k, e in errs.items() if not e <= TOL}
        assert not bad, bad
        assert launches > 0
