"""Segmented (document-masked) blocks against a masked float64 reference: forward, lse, backward from the
block's own out/lse, rows without keys, skipped segments, and the dense fast path."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_tasp.engine import thd as engine_thd
from megatron_tasp.kernels import get_kernel
from megatron_tasp.kernels.bucketed import BucketedBlock, bucket_rows
from megatron_tasp.kernels.math_ref import MathAttention
from megatron_tasp.kernels.segmented import row_count, segment_rows, segmented_block
from megatron_tasp.thd import engine_order, engine_segments

CPU = torch.device("cpu")


def _reference(q, k, v, dout, seg_q, seg_k, causal, scale):
    """Masked attention in float64 ([b, h, s, d], GQA by repetition): out, lse and the gradients."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.double().clone().requires_grad_() for x in (q, k, v))
    mask = seg_q[:, None] == seg_k[None, :]
    if causal:
        mask &= torch.ones(len(seg_q), len(seg_k), dtype=torch.bool).tril()
    seen = mask.any(-1)
    scores = qd @ kd.repeat_interleave(g, 1).transpose(-1, -2) * scale
    scores = scores.masked_fill(~(mask | ~seen[:, None]), float("-inf"))
    lse = torch.where(seen, scores.logsumexp(-1), torch.tensor(float("-inf"), dtype=torch.float64))
    out = (scores.softmax(-1) @ vd.repeat_interleave(g, 1)) * seen[:, None]
    out.backward(dout.double())
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad


@pytest.mark.parametrize("name", ["cpu", "math"])
@pytest.mark.parametrize("causal", [True, False])
def test_segmented_block_matches_a_masked_reference(name, causal):
    gen = torch.Generator().manual_seed(1)
    sq = 24
    seg_q = torch.tensor([0] * 5 + [1] * 3 + [3] * 4 + [0] * 2 + [1] * 6 + [5] * 4)  # runs, repeats, a lone id
    seg_k = seg_q.clone() if causal else torch.tensor([1] * 7 + [0] * 4 + [4] * 5 + [3] * 3)
    q = torch.randn(2, 4, sq, 8, generator=gen)
    k, v = (torch.randn(2, 2, len(seg_k), 8, generator=gen) for _ in range(2))
    dout = torch.randn(2, 4, sq, 8, generator=gen)
    kern = get_kernel(name, "cpu", torch.float32, 8)
    block = segmented_block(kern, seg_q, seg_k, torch.device("cpu"))
    assert not block.full and len(block.pairs) == len(set(seg_q.tolist()) & set(seg_k.tolist()))
    out, lse, ctx = block.forward_unchecked(q, k, v, causal=causal, scale=0.3)
    r_out, r_lse, r_dq, r_dk, r_dv = _reference(q, k, v, dout, seg_q, seg_k, causal, 0.3)
    torch.testing.assert_close(out.double(), r_out, rtol=1e-5, atol=1e-5)
    finite = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse), finite) and torch.all(out[~finite.expand_as(lse)] == 0)
    torch.testing.assert_close(lse.double()[finite], r_lse[finite], rtol=1e-5, atol=1e-5)
    dq, dk, dv = block.backward_unchecked(dout, q, k, v, out, lse, ctx, causal=causal, scale=0.3)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_no_shared_segment_launches_nothing():
    class Boom:
        name = "boom"

        def forward_unchecked(self, *a, **kw):
            raise AssertionError("no kernel may run on a block without a shared segment")

        backward_unchecked = forward_unchecked

    q = torch.randn(1, 2, 4, 8)
    block = segmented_block(Boom(), torch.tensor([0, 0, 1, 1]), torch.tensor([2, 3, 3]), torch.device("cpu"))
    k = torch.randn(1, 2, 3, 8)
    out, lse, ctx = block.forward_unchecked(q, k, k, causal=False, scale=1.0)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    grads = block.backward_unchecked(q, q, k, k, out, lse, ctx, causal=False, scale=1.0)
    assert all(torch.all(g == 0) for g in grads) and grads[1].shape == k.shape


def test_one_segment_everywhere_is_the_dense_kernel():
    kern = get_kernel("cpu", "cpu", torch.float32, 8)
    block = segmented_block(kern, torch.full((6,), 4), torch.full((6,), 4), torch.device("cpu"))
    assert block.full
    q = torch.randn(1, 2, 6, 8)
    a = block.forward_unchecked(q, q, q, causal=True, scale=0.5)
    b = kern.forward_unchecked(q, q, q, causal=True, scale=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_tiny_segments_run_on_the_math_kernel():
    """Segments under TINY_ROWS rows on either side run on the math kernel (fused GPU kernels reject some:
    cuDNN refuses s_q = s_kv = 1); larger ones keep the dense kernel; results are unchanged."""
    from megatron_tasp.kernels import get_kernel
    from megatron_tasp.kernels.segmented import TINY_ROWS, segmented_block

    dense = get_kernel("cpu", "cpu", torch.float32, 16)
    seg = torch.tensor([0] * (TINY_ROWS + 4) + [1] + [2] * 3)
    block = segmented_block(dense, seg, seg, torch.device("cpu"))
    assert [kern.name for kern in block.kernels] == ["cpu", "math", "math"]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, seg.numel(), 16, generator=g) for _ in range(3))
    out, lse, _ = block.forward_unchecked(q, k, v, causal=True, scale=0.25)
    for ident in (0, 1, 2):
        rows = (seg == ident).nonzero().flatten()
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows],
                                                               is_causal=True, scale=0.25)
        assert torch.allclose(out[:, :, rows], ref, atol=1e-5)


def test_segment_rows_are_slices_for_runs_and_indices_otherwise():
    """Every id one contiguous run (documents in their own order): slices, found without a per-id pass; an id
    in two runs (a document's front and back chunks apart): its ascending indices, while the ids that are one
    run stay slices."""
    runs = segment_rows(torch.tensor([4, 4, 0, 0, 0, 7, 2, 2]))
    assert runs == {4: slice(0, 2), 0: slice(2, 5), 7: slice(5, 6), 2: slice(6, 8)}
    split = segment_rows(torch.tensor([1, 1, 3, 1, 3, 3, 5]))
    assert split[1].tolist() == [0, 1, 3] and split[3].tolist() == [2, 4, 5] and split[5] == slice(6, 7)
    assert segment_rows(torch.tensor([], dtype=torch.long)) == {}


def test_segment_rows_leave_out_negative_ids():
    """Rows with a negative id match nothing: no entry, and they never force the index path (several runs of
    -1 beside runs of real ids keep slices); a block whose one shared segment leaves such rows out is not the
    dense 'full' block."""
    runs = segment_rows(torch.tensor([-1, -1, 0, 0, -1, 2, 2, -2]))
    assert runs == {0: slice(2, 4), 2: slice(5, 7)}
    split = segment_rows(torch.tensor([-1, 1, -1, 1, 3]))
    assert split[1].tolist() == [1, 3] and split[3] == slice(4, 5) and -1 not in split
    assert segment_rows(torch.tensor([-1, -1])) == {}
    block = segmented_block(MathAttention(), torch.tensor([-1, 0, 0]), torch.tensor([0, 0, 0]), CPU)
    assert not block.full and block.pairs == [(slice(1, 3), slice(0, 3))]


def test_natural_segments_equal_the_engine_order_ones():
    """The CP THD-order segment ids (built directly per document) are the [F ; B] engine ids moved to the THD
    local order, and the back-chunk flags the engine order's second half, for random paddings at CP 2-4."""
    rng = random.Random(3)
    for _ in range(60):
        n = rng.choice([2, 3, 4])
        pads = [2 * n * rng.randint(0, 5) for _ in range(rng.randint(1, 9))]
        cu_pad, cu = [0], [0]
        for p in pads:
            cu_pad.append(cu_pad[-1] + p)
            cu.append(cu[-1] + rng.randint(0, p))
        order = engine_order(cu_pad, n)
        for rank in range(n):
            want = torch.empty(order.numel(), dtype=torch.long)
            want[order] = engine_segments(cu_pad, cu, n, rank)
            want_back = torch.zeros(order.numel(), dtype=torch.bool)
            want_back[order[order.numel() // 2:]] = True
            seg, back = engine_thd._natural_segments(cu_pad, cu, n, rank)
            assert torch.equal(seg, want) and torch.equal(back, want_back)


def test_bucket_rows_bound_the_shapes():
    """Every size rounds up to at most 8 shapes per power of two, multiples of 128, at most 1/8 more rows from
    1024 on."""
    sizes = list(range(1, 70_000, 7))
    buckets = [bucket_rows(n) for n in sizes]
    assert all(b >= n and b % 128 == 0 for n, b in zip(sizes, buckets))
    assert all(b <= n * 1.125 for n, b in zip(sizes, buckets) if n >= 1024)
    for lo in (1024, 4096, 32768):
        assert len({b for n, b in zip(sizes, buckets) if lo < n <= 2 * lo}) <= 8
    with pytest.raises(ValueError):
        bucket_rows(0)


@pytest.mark.parametrize("hkv", [4, 2])
def test_bucketed_block_equals_the_segmented_block(hkv):
    """Square causal segments padded to their bucket give the unpadded block's out, lse and gradients (the
    backward from a merged out/lse), for runs and scattered rows; a non-causal call fails closed."""
    gen = torch.Generator().manual_seed(5)
    seg = torch.tensor([0] * 150 + [1] * 7 + [0] * 40 + [2] * 300 + [3] * 3)  # doc 0 in two runs
    q = torch.randn(1, 4, len(seg), 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, hkv, len(seg), 8, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    kern = get_kernel("math", "cpu", torch.float64, 8)
    ref = segmented_block(kern, seg, seg, CPU)
    big = [(iq, ik) for iq, ik in ref.pairs if row_count(iq) >= 100]
    assert len(big) == 2 and any(not isinstance(iq, slice) for iq, _ in big)
    block = BucketedBlock(kern, big)
    part = segmented_block(kern, torch.where(seg.eq(0) | seg.eq(2), seg, -1), torch.where(seg.eq(0) | seg.eq(2), seg,
                                                                                         -2), CPU)
    o1, l1, c1 = part.forward_unchecked(q, k, v, causal=True, scale=0.3)
    o2, l2, c2 = block.forward_unchecked(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.isinf(l1), torch.isinf(l2))
    torch.testing.assert_close(l2[torch.isfinite(l2)], l1[torch.isfinite(l1)], rtol=1e-10, atol=1e-12)
    out_m, lse_m = o1 * 0.7, torch.where(torch.isfinite(l1), l1 + 0.25, l1)
    for a, b in zip(block.backward_unchecked(dout, q, k, v, out_m, lse_m, c2, causal=True, scale=0.3),
                    part.backward_unchecked(dout, q, k, v, out_m, lse_m, c1, causal=True, scale=0.3)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="causal"):
        block.forward_unchecked(q, k, v, causal=False, scale=0.3)
    with pytest.raises(ValueError, match="square"):
        BucketedBlock(kern, [(slice(0, 4), slice(0, 5))])
