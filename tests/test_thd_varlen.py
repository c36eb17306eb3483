"""The one-launch varlen block (megatron_tasp.kernels.varlen) on CPU with a float64 reference of the varlen
ops passed in: it equals the per-document segmented block (forward, lse, backward from merged out/lse) and,
forced into the engine (its one ops hook, ``engine.thd._varlen_ops``, monkeypatched), packed-document attention
stays exact for CP 1 to 5 and 8, with ``options.packed_dense_rows`` sending large segments to the dense kernel.
The real flash op is checked on GPU by scripts/gpu_check_thd.py."""

from __future__ import annotations

import pytest
import torch

import megatron_tasp.engine.backward as engine_backward
import megatron_tasp.engine.thd as engine_thd
from megatron_tasp import clear_plan_cache, tasp_attention
from megatron_tasp.engine.backward import halves_of_one_buffer
from megatron_tasp.engine.cache import PLAN_CACHE
from megatron_tasp.engine.errors import TaspConfigError
from megatron_tasp.kernels import cudnn_varlen, get_kernel
from megatron_tasp.kernels import varlen as varlen_mod
from megatron_tasp.kernels.segmented import SegmentedBlock, segmented_block
from megatron_tasp.kernels.varlen import VarlenBlock
from megatron_tasp.launch import run_workers
from megatron_tasp.options import TaspOptions
from tests import varlen_reference
from tests.test_thd import TOL, _sequence_case, boundaries, mixes, run_case

CPU = torch.device("cpu")
PAIR_COPIES: list[int] = []  # dK/dV sent on as one buffer's halves (see the spans test)


@pytest.fixture
def reference_ops():
    varlen_reference.CALLS.update(forward=0, backward=0, spans=0)


@pytest.fixture
def engine_reference_ops(reference_ops, monkeypatch):
    """Every packed-document block of the engine on the varlen path, with the float64 reference ops."""
    monkeypatch.setattr(engine_thd, "_varlen_ops", lambda kernel, device, *_: varlen_reference.REFERENCE_OPS)


def _pair(seg_q, seg_k, big_rows=None, ops=None):
    kern = get_kernel("math", "cpu", torch.float32, 8)
    seg = segmented_block(kern, seg_q, seg_k, CPU)
    return seg, VarlenBlock(seg, CPU, big_rows=big_rows, ops=ops or varlen_reference.REFERENCE_OPS)


def _varlen_blocks(layout) -> list[VarlenBlock]:
    """The varlen blocks of a packed-document layout (the local block and every remote one)."""
    call = layout.call
    blocks = [call.local_kernel, *(b for lanes in getattr(call, "blocks", [])[1:] for lane in lanes
                                   for _, _, b in lane)]
    return [b for b in blocks if isinstance(b, VarlenBlock)]


def _dense_segments(layout, dense_rows: int | None, causal: bool) -> int:
    """Segments on the dense kernel; asserts that only the own block of a causal call got ``dense_rows`` and that
    it split its square segments by it (every other block: all segments varlen)."""
    count = 0
    for b in _varlen_blocks(layout):
        want = dense_rows if (b is layout.call.local_kernel and causal) else None
        assert b.big_rows == want and b.ops in (varlen_reference.REFERENCE_OPS, varlen_reference.SPANS_OPS)
        rows = [(int(b.cu_q[i + 1] - b.cu_q[i]), int(b.cu_k[i + 1] - b.cu_k[i])) for i in range(len(b.cu_q) - 1)]
        assert want is None or all(nq != nk or nq < want for nq, nk in rows), (rows, want)
        count += len(b.big.pairs) if b.big is not None else 0
    return count


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
    assert (var.big is not None) == (big_rows == 5 and causal) and var.small  # square (causal) segments only
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


@pytest.mark.parametrize("spans", [False, True], ids=["cu_seqlens", "spans"])
def test_dense_documents_beside_an_in_place_varlen_launch(reference_ops, spans):
    """Causal own block of contiguous documents with two large ones: the large ones run bucket-padded on the
    dense kernel, the others in ONE in-place varlen launch where the large ones' rows have no partner; the result
    equals the per-document block, forward and backward from a merged out/lse. With a pair that takes spans and
    asks for even ones, an odd span is lent the first row of the dense document after it, which the dense call
    then writes over."""
    gen = torch.Generator().manual_seed(4)
    seg = torch.tensor([0] * 7 + [1] * 3 + [2] * 9 + [3] * 2 + [4] * 1)
    q = torch.randn(1, 4, len(seg), 8, generator=gen)
    k, v = (torch.randn(1, 2, len(seg), 8, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)
    ref, var = _pair(seg, seg, big_rows=5, ops=varlen_reference.SPANS_OPS if spans else None)
    assert var.big is not None and len(var.big.pairs) == 2 and var.small
    if spans:  # the 3-row document lends row 10 (the 9-row dense one's first); the last 1-row one has none
        assert var.launch_spans[True].q.tolist() == [[7, 11], [19, 21], [21, 22]]
        assert var.launch_spans[True].borrowed.tolist() == [10]
    assert var.q_index == slice(0, len(seg)) and var.lonely_q is not None  # in place: nothing gathered
    o1, l1, c1 = ref.forward_unchecked(q, k, v, causal=True, scale=0.3)
    o2, l2, c2 = var.forward_unchecked(q, k, v, causal=True, scale=0.3)
    assert varlen_reference.CALLS["forward"] == 1
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    out_m, lse_m = o1 * 0.7, l1 + 0.25
    for a, b in zip(var.backward_unchecked(dout, q, k, v, out_m, lse_m, c2, causal=True, scale=0.3),
                    ref.backward_unchecked(dout, q, k, v, out_m, lse_m, c1, causal=True, scale=0.3)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="causal"):
        var.forward_unchecked(q, k, v, causal=False, scale=0.3)


def test_one_dense_document_over_every_row_takes_the_bucketed_copy(engine_reference_ops):
    """A single document filling a causal own block: with dense rows it runs bucket-padded like any dense document
    (cuDNN must not see a shape both strided and contiguous), without them the dense kernel as is."""
    seg = torch.tensor([3] * 12)
    kern = get_kernel("math", "cpu", torch.float32, 8)
    assert isinstance(engine_thd._block(kern, seg, seg, CPU, None), SegmentedBlock)
    block = engine_thd._block(kern, seg, seg, CPU, 5)
    assert isinstance(block, VarlenBlock) and block.big is not None and not block.small and block.full
    assert isinstance(engine_thd._block(kern, seg, seg, CPU, 13), SegmentedBlock)  # smaller than the threshold
    gen = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, 2, 12, 8, generator=gen) for _ in range(4))
    o1, l1, c1 = block.fallback.forward_unchecked(q, k, v, causal=True, scale=0.4)
    o2, l2, c2 = block.forward_unchecked(q, k, v, causal=True, scale=0.4)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(block.backward_unchecked(dout, q, k, v, o1, l1, c2, causal=True, scale=0.4),
                    block.fallback.backward_unchecked(dout, q, k, v, o1, l1, c1, causal=True, scale=0.4)):
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


GAPS_Q = [-1] * 2 + [0] * 3 + [-1] * 2 + [1] * 4 + [2] * 2 + [-1]  # -1: queries without keys
GAPS_K = [0] * 4 + [-2] * 3 + [1] * 2 + [-2] + [2] * 5 + [-2] * 2  # -2: keys without queries
PADDED_Q = [0] * 3 + [-1] + [1] * 4 + [2] * 3 + [-1]  # an own block of padded documents: odd runs, padding after
PADDED_K = [0] * 3 + [-2] + [1] * 4 + [2] * 3 + [-2]


@pytest.mark.parametrize("unset", [False, True, "spans"], ids=["zeroing_pair", "unset_pair", "spans_pair"])
@pytest.mark.parametrize("causal,seg_q,seg_k,cu_q,cu_k", [
    (False, GAPS_Q, GAPS_K, [0, 2, 5, 7, 7, 11, 11, 13, 14, 14], [0, 0, 4, 4, 7, 9, 10, 15, 15, 17]),
    (True, [0] * 3 + [1] * 4 + [2] * 2, [0] * 3 + [1] * 4 + [2] * 2, [0, 3, 7, 9], [0, 3, 7, 9]),
    (True, PADDED_Q, PADDED_K, [0, 3, 4, 4, 8, 11, 12, 12], [0, 3, 3, 4, 8, 11, 11, 12]),
    (False, [-1, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 4, 9], [0, 0, 2, 4]),
    # causal: an odd span whose only free row is in front keeps its length (a row in front shifts the diagonal)
    (True, [-1, 0, 0, 0, 1, 1, 1, 1, 1], [-2, 0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 4, 9], [0, 0, 1, 4, 9]),
])
def test_ascending_runs_run_in_place(reference_ops, causal, seg_q, seg_k, cu_q, cu_k, unset):
    """Shared segments that are runs ascending on both sides: one launch over EVERY row, no gather; rows
    between them become segments with an empty partner (queries without keys: output 0, lse -inf although
    the op gives +inf; keys without queries: dk/dv 0), which the block writes itself, also when the pair
    leaves them unset (NaN here, as cuDNN leaves the output rows), and when the pair takes spans (the shared
    segments alone; every other row left NaN); equal to the segmented block."""
    ops = {False: None, True: varlen_reference.UNSET_OPS, "spans": varlen_reference.SPANS_OPS}[unset]
    seg, var = _pair(torch.tensor(seg_q), torch.tensor(seg_k), ops=ops)
    t_q, t_k = len(seg_q), len(seg_k)
    assert var.q_index == slice(0, t_q) and var.k_index == slice(0, t_k), "in place"
    assert var.cu_q.tolist() == cu_q and var.cu_k.tolist() == cu_k
    lonely = [x == -1 for x in seg_q]
    assert (var.lonely_q.tolist() if var.lonely_q is not None else [False] * t_q) == lonely
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, t_q, 8, generator=gen)
    k, v = (torch.randn(1, 2, t_k, 8, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)
    o1, l1, c1 = seg.forward_unchecked(q, k, v, causal=causal, scale=0.4)
    o2, l2, c2 = var.forward_unchecked(q, k, v, causal=causal, scale=0.4)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    assert torch.equal(l2 == float("-inf"), l1 == float("-inf")) and not torch.isposinf(l2).any()
    assert bool((l2[0, :, torch.tensor(lonely)] == float("-inf")).all())
    torch.testing.assert_close(l2[torch.isfinite(l2)], l1[torch.isfinite(l1)], rtol=1e-5, atol=1e-6)
    out_m, lse_m = o1 * 0.7, torch.where(torch.isfinite(l1), l1 + 0.25, l1)
    g1 = seg.backward_unchecked(dout, q, k, v, out_m, lse_m, c1, causal=causal, scale=0.4)
    g2 = var.backward_unchecked(dout, q, k, v, out_m, lse_m, c2, causal=causal, scale=0.4)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not any(bool(x.isnan().any()) for x in (o2, l2, *g2))
    assert varlen_reference.CALLS == {"forward": 1, "backward": 1, "spans": int(unset == "spans")}
    shared = [(a, b) for a, b in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])) if a[0] < a[1] and b[0] < b[1]]
    assert var.spans.q.tolist() == [list(a) for a, _ in shared] and var.spans.k.tolist() == [list(b) for _, b in shared]


def test_odd_spans_are_lent_a_row_without_a_partner():
    """A pair that asks for even query spans (cuDNN's) gets each odd span lengthened by one adjacent query row
    without a partner, each row lent once: the row after the span, or (not causal only) the row before it; the
    key spans stay. With no such row the span stays odd; a pair that does not ask gets the spans as they are."""
    _, var = _pair(torch.tensor(PADDED_Q), torch.tensor(PADDED_K), ops=varlen_reference.SPANS_OPS)
    for causal in (True, False):  # the padding after each odd document's run
        s = var.launch_spans[causal]
        assert s.q.tolist() == [[0, 4], [4, 8], [8, 12]] and s.borrowed.tolist() == [3, 11] and s.max_q == 4
        assert s.k.tolist() == var.spans.k.tolist() == [[0, 3], [4, 8], [8, 11]] and s.max_k == 4
    ops = varlen_reference.SPANS_OPS
    _, var = _pair(torch.tensor([-1, 0, 0, 0, 1, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), ops=ops)
    assert var.launch_spans[True] is var.spans and var.spans.q.tolist() == [[1, 4], [4, 9]]  # nothing after
    full = var.launch_spans[False]  # the row in front; the last span has no free row on either side
    assert full.q.tolist() == [[0, 4], [4, 9]] and full.borrowed.tolist() == [0] and full.max_q == 5
    _, plain = _pair(torch.tensor(PADDED_Q), torch.tensor(PADDED_K), ops=type(ops)(ops.forward, ops.backward,
                                                                                   spans=ops.spans))
    assert plain.launch_spans[True] is plain.spans and plain.launch_spans[False] is plain.spans


def test_in_place_declines_what_it_cannot_serve(reference_ops):
    """Gathers instead of the in-place form: one-row query segments outnumbered by segments (FlashAttention-2's
    GQA reshape for max_q == 1 would fail), blocks with dense segments, blocks of unknown size; and the in-place
    block refuses tensors of other row counts than it was built for."""
    one_row = torch.tensor([0, -1, 1, 2, -1, 3])  # every query segment one row, gaps between
    keys = torch.tensor([0, 0, 1, -2, 2, 3, 3])
    _, var = _pair(one_row, keys)
    assert not isinstance(var.q_index, slice) and var.lonely_q is None and var.max_q == 1
    _, var = _pair(torch.tensor([0, -1, 1]), torch.tensor([0, 1]))  # as many segments as rows: gathers too
    assert not isinstance(var.q_index, slice) and var.lonely_q is None and var.max_q == 1
    _, var = _pair(torch.tensor([0] * 6 + [1] * 6), torch.tensor([0] * 6 + [1] * 6), big_rows=5)
    assert var.big is not None and var.lonely_q is None
    kern = get_kernel("math", "cpu", torch.float32, 8)
    seg = segmented_block(kern, torch.tensor(GAPS_Q), torch.tensor(GAPS_K), CPU)
    seg.rows = None
    assert not isinstance(VarlenBlock(seg, CPU, ops=varlen_reference.REFERENCE_OPS).q_index, slice)
    _, var = _pair(torch.tensor(GAPS_Q), torch.tensor(GAPS_K))
    q = torch.randn(1, 2, len(GAPS_Q) + 1, 8)
    k = torch.randn(1, 2, len(GAPS_K), 8)
    with pytest.raises(RuntimeError, match="query/key rows"):
        var.forward_unchecked(q, k, k, causal=False, scale=0.5)


def test_the_real_op_declines_cpu_tensors():
    q = torch.randn(1, 2, 4, 8)
    assert "CUDA" in varlen_mod.varlen_reason(q, q)
    assert varlen_mod.varlen_reason(q, q, varlen_reference.REFERENCE_OPS) is None
    two_docs = torch.tensor([0, 0, 1, 1])
    seg = segmented_block(get_kernel("math", "cpu", torch.float32, 8), two_docs, two_docs, CPU)
    block = VarlenBlock(seg, CPU)  # the flash pair by default: on CPU the block runs per document
    assert block.ops is varlen_mod.flash_varlen_ops()
    _, _, ctx = block.forward_unchecked(q, q, q, causal=True, scale=0.5)
    assert not (isinstance(ctx, tuple) and ctx[0] == "varlen")
    # the engine picks a varlen pair only for CUDA tensors of a kernel that has a varlen form: options.packed_kernel
    # names the pair ('auto': per call cuDNN's where it can serve, else FlashAttention-2's)
    cudnn = type("K", (), {"name": "cudnn"})()
    gpu = torch.device("cuda", 0)
    for choice in ("auto", "flash", "cudnn"):
        assert engine_thd._varlen_ops(cudnn, CPU, choice) is None
    assert engine_thd._varlen_ops(cudnn, gpu) is cudnn_varlen.auto_varlen_ops()
    assert engine_thd._varlen_ops(cudnn, gpu, "flash") is varlen_mod.flash_varlen_ops()
    assert engine_thd._varlen_ops(type("K", (), {"name": "math"})(), gpu) is None


def test_packed_kernel_cudnn_fails_closed(monkeypatch):
    """An explicit 'cudnn' that cannot run raises (before the ranks agree on a layout, so every rank reports it);
    'auto' and 'flash' never do; CPU blocks run per document whatever the option says."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(engine_thd, "cudnn_available", lambda device: "the cuDNN frontend is not installed (pip "
                        "install nvidia-cudnn-frontend)")
    with pytest.raises(TaspConfigError, match="packed_kernel='cudnn'.*nvidia-cudnn-frontend"):
        engine_thd._varlen_ops(type("K", (), {"name": "cudnn"})(), gpu, "cudnn")
    with pytest.raises(TaspConfigError, match="packed_kernel='cudnn'"):
        engine_thd.check_packed_kernel("cudnn", gpu)
    for choice in ("auto", "flash"):
        engine_thd.check_packed_kernel(choice, gpu)
    engine_thd.check_packed_kernel("cudnn", CPU)
    # with the frontend there, the inputs decide: fp16/bf16 and head dims up to 128 (multiples of 8)
    monkeypatch.setattr(engine_thd, "cudnn_available", lambda device: None)
    engine_thd.check_packed_kernel("cudnn", gpu, torch.bfloat16, 128)
    for dtype, d, why in ((torch.float32, 64, "dtype"), (torch.bfloat16, 256, "head dim 256"),
                          (torch.float16, 60, "head dim 60")):
        with pytest.raises(TaspConfigError, match=f"packed_kernel='cudnn': {why}.*'auto'"):
            engine_thd.check_packed_kernel("cudnn", gpu, dtype, d)


def _check_on_one_rank_worker(rank, n):
    """The packed-kernel check fails on rank 1 only: the layout's agreement must make every rank raise."""
    import torch.distributed as dist

    def check(packed_kernel, device, dtype=None, head_dim=None):
        if dist.get_rank() == 1:
            raise TaspConfigError("packed_kernel='cudnn': test reason")

    engine_thd.check_packed_kernel = check  # this forked worker's module only
    cu_pad, cu = boundaries([8, 12], n)
    try:
        run_case(dist.group.WORLD, cu_pad, cu, True, 2)
    except TaspConfigError as exc:
        return str(exc)
    return "no error"


def test_a_packed_kernel_problem_on_one_rank_fails_every_rank():
    messages = run_workers(_check_on_one_rank_worker, 2, timeout_s=120)
    assert "rejected its document boundaries or this packed-documents call" in messages[0], messages
    assert messages[1] == "packed_kernel='cudnn': test reason", messages


def test_backward_capacity_bounds_the_accumulator():
    assert [cudnn_varlen._capacity(r) for r in (1, 64, 65, 32768, 32769, 65536, 70000)] == \
        [64, 64, 128, 32768, 65536, 65536, 98304]


def test_cudnn_available_names_what_is_missing(monkeypatch):
    gpu = torch.device("cuda", 0)
    assert "CUDA" in cudnn_varlen.cudnn_available(CPU)
    monkeypatch.setattr(cudnn_varlen, "cudnn_frontend", lambda: None)
    assert "nvidia-cudnn-frontend" in cudnn_varlen.cudnn_available(gpu)
    fake = type("F", (), {"backend_version": staticmethod(lambda: 90500),
                          "backend_version_string": staticmethod(lambda: "9.5.0")})
    monkeypatch.setattr(cudnn_varlen, "cudnn_frontend", lambda: fake)
    assert "9.5.0" in cudnn_varlen.cudnn_available(gpu)
    fake.backend_version = staticmethod(lambda: 91900)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "Hopper" in cudnn_varlen.cudnn_available(gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert cudnn_varlen.cudnn_available(gpu) is None


def test_auto_pair_dispatches_per_call_and_backward_follows_forward(monkeypatch):
    """'auto': cuDNN's pair where its reason is None, else FlashAttention-2's; the backward runs the pair that
    ran the forward; its reason is flash's only when cuDNN cannot serve."""
    calls = []

    def pair(name):
        return varlen_mod.VarlenOps(lambda *a: (calls.append(name + ".fwd"), a[0], None)[1:] + (name,),
                                    lambda *a: calls.append(name + ".bwd") or (a[1], a[2], a[3]),
                                    lambda q: f"{name} cannot")

    flash = pair("flash")
    cudnn_fake = pair("cudnn")
    monkeypatch.setattr(cudnn_varlen, "flash_varlen_ops", lambda: flash)
    monkeypatch.setattr(cudnn_varlen._STATE, "forward", lambda *a: cudnn_fake.forward(*a))
    monkeypatch.setattr(cudnn_varlen, "_OPS", cudnn_fake)
    auto = cudnn_varlen.auto_varlen_ops()
    q = torch.randn(4, 2, 8)
    for reason, want in ((None, "cudnn"), ("head dim 256", "flash")):
        calls.clear()
        monkeypatch.setattr(cudnn_varlen, "cudnn_varlen_reason", lambda q, r=reason: r)
        _, _, aux = auto.forward(q, q, q, None, None, 4, 4, True, 0.5)
        auto.backward(q, q, q, q, q, None, None, None, 4, 4, True, 0.5, aux)
        assert calls == [f"{want}.fwd", f"{want}.bwd"]
        assert auto.reason(q) == (None if reason is None else "flash cannot")


def test_strict_cudnn_pair_raises_instead_of_declining():
    """An explicit 'cudnn' never sends a block to the per-document loop: a call it cannot serve raises."""
    strict = cudnn_varlen.strict_cudnn_varlen_ops()
    assert strict.reason is None
    q = torch.randn(4, 2, 8)
    with pytest.raises(cudnn_varlen.CudnnVarlenError, match="packed_kernel='cudnn' cannot serve.*CUDA"):
        strict.forward(q, q, q, None, None, 4, 4, True, 0.5)


def test_packed_kernel_reaches_the_blocks(monkeypatch):
    """The call's options.packed_kernel is what the engine asks the varlen hook for, on every block."""
    seen = []

    def hook(kernel, device, packed_kernel="auto"):
        seen.append(packed_kernel)
        return varlen_reference.REFERENCE_OPS

    monkeypatch.setattr(engine_thd, "_varlen_ops", hook)
    clear_plan_cache()
    q = torch.randn(16, 2, 8, dtype=torch.float64)
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    tasp_attention(q, q, q, None, causal=True, cu_seqlens_padded=cu, cu_seqlens=cu,
                   options=TaspOptions(packed_kernel="flash"))
    assert seen and set(seen) == {"flash"}


def test_cudnn_graph_key_rounds_to_powers_of_two():
    assert cudnn_varlen.graph_key(1, 1, 1) == (1, 64, 64)
    assert cudnn_varlen.graph_key(5, 65, 64) == (8, 128, 64)
    assert cudnn_varlen.graph_key(8, 4096, 4097) == (8, 4096, 8192)
    # document mixes of one size share a handful of graphs
    keys = {cudnn_varlen.graph_key(n, m, m) for n in range(3, 40) for m in range(600, 5000, 37)}
    assert len(keys) == 5 * 4  # segment counts 4..64, longest segments 1024..8192


def test_cudnn_columns_pad_with_empty_segments():
    cols = cudnn_varlen._CudnnRagged._build_columns(torch.tensor([0, 3, 3, 7], dtype=torch.int32),
                                                    torch.tensor([0, 2, 5, 5], dtype=torch.int32), 4, 4, 32, 16)
    assert cols["len_q"].flatten().tolist() == [3, 0, 4, 0]
    assert cols["len_k"].flatten().tolist() == [2, 3, 0, 0]
    assert cols["off_q"].flatten().tolist() == [0, 96, 96, 224, 224]  # rows x heads x head dim
    assert cols["off_k"].flatten().tolist() == [0, 32, 80, 80, 80]
    assert cols["off_stats"].flatten().tolist() == [0, 12, 12, 28, 28]  # rows x heads
    assert cols["len_q"].dtype == torch.int32 and cols["off_q"].dtype == torch.int64  # what the graphs declare
    assert cols["off_stats"].dtype == torch.int64


def test_halves_of_one_buffer():
    """dK/dV written as the halves of one [m, 2, b, h, d] buffer are recognised (a view of that buffer, equal to
    stacking them); separate tensors, V before K, or other strides are not."""
    buf = torch.randn(5, 2, 1, 3, 4)
    dk, dv = buf[:, 0], buf[:, 1]
    pair = halves_of_one_buffer(dk, dv)
    assert pair is not None and pair.data_ptr() == buf.data_ptr() and torch.equal(pair, torch.stack((dk, dv), 1))
    assert halves_of_one_buffer(dv, dk) is None
    assert halves_of_one_buffer(dk.clone(), dv.clone()) is None
    assert halves_of_one_buffer(buf[::2, 0], buf[::2, 1]) is None
    one = torch.randn(1, 2, 1, 3, 4)
    assert torch.equal(halves_of_one_buffer(one[:, 0], one[:, 1]), one)


def test_fill_rows_off_cuda_is_index_fill():
    """Off CUDA (and for layouts the Triton kernel does not take) the row fill is torch's index_fill_."""
    from megatron_tasp.kernels.rowfill import fill_rows_

    rows = torch.tensor([4, 1])
    for x in (torch.randn(6, 3, 2), torch.randn(6, 2, 3, 2)[:, 1], torch.randn(3, 6).t()):
        want = x.clone().index_fill_(0, rows, 0.5)
        assert fill_rows_(x, rows, 0.5) is x and torch.equal(x, want)
    empty = torch.randn(3, 2)
    assert torch.equal(fill_rows_(empty.clone(), torch.zeros(0, dtype=torch.long), 1.0), empty)


def test_add_halves_off_cuda_is_torch_add():
    """Off CUDA (and for tensors the Triton kernel does not take) the hop home's add is torch.add of each half."""
    from megatron_tasp.kernels.pairadd import add_halves

    pair = torch.randn(5, 2, 3, 4)
    for a0, a1 in ((torch.randn(5, 3, 4), torch.randn(5, 3, 4)),
                   (torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64))):
        o0, o1 = add_halves(a0, a1, pair)
        assert torch.equal(o0, a0 + pair[:, 0]) and torch.equal(o1, a1 + pair[:, 1])


def test_cudnn_columns_from_spans():
    """Spans (segments anywhere, gaps between them): offsets at each span's first row, the empty segments and
    the offset past the last at the end of the last span; the same columns as cu_seqlens where no gap."""
    spans_q = torch.tensor([[2, 5], [7, 11]], dtype=torch.int32)
    spans_k = torch.tensor([[0, 4], [6, 9]], dtype=torch.int32)
    cols = cudnn_varlen._CudnnRagged._build_columns(spans_q, spans_k, 4, 4, 32, 16)
    assert cols["len_q"].flatten().tolist() == [3, 4, 0, 0] and cols["len_k"].flatten().tolist() == [4, 3, 0, 0]
    assert cols["off_q"].flatten().tolist() == [64, 224, 352, 352, 352]
    assert cols["off_k"].flatten().tolist() == [0, 96, 144, 144, 144]
    assert cols["off_stats"].flatten().tolist() == [8, 28, 44, 44, 44]
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    back_to_back = torch.tensor([[0, 3], [3, 7]], dtype=torch.int32)
    a = cudnn_varlen._CudnnRagged._build_columns(cu, cu, 2, 2, 8, 8)
    b = cudnn_varlen._CudnnRagged._build_columns(back_to_back, back_to_back, 2, 2, 8, 8)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert cudnn_varlen._segment_count(spans_q) == 2 and cudnn_varlen._segment_count(cu) == 2


def test_auto_pair_takes_spans_only_where_cudnn_serves(monkeypatch):
    """'auto' takes spans exactly when it would run cuDNN's pair (flash's needs cu_seqlens), and refuses spans on
    a call cuDNN cannot serve rather than hand them to flash; the explicit pairs say so statically."""
    auto = cudnn_varlen.auto_varlen_ops()
    q = torch.randn(4, 2, 8)
    monkeypatch.setattr(cudnn_varlen, "cudnn_varlen_reason", lambda q: None)
    assert auto.takes_spans(q)
    monkeypatch.setattr(cudnn_varlen, "cudnn_varlen_reason", lambda q: "head dim 256")
    assert not auto.takes_spans(q)
    with pytest.raises(RuntimeError, match="spans"):
        auto.forward(q, q, q, torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32), 1, 1,
                     False, 0.5)
    assert cudnn_varlen.cudnn_varlen_ops().takes_spans(q) and cudnn_varlen.strict_cudnn_varlen_ops().takes_spans(q)
    assert not varlen_mod.flash_varlen_ops().takes_spans(q)


def _engine_worker(rank, n, dense_rows):
    import torch.distributed as dist

    opts = TaspOptions(packed_dense_rows=dense_rows)
    scope = PLAN_CACHE.scope(dist.group.WORLD)
    errs, dense, lent = {}, 0, 0
    for name, lengths in mixes(n, 5).items():
        cu_pad, cu = boundaries(lengths, n)
        for causal in (True, False):
            # two chunks of every ring's piece: fewer rings than the most at CP 8 (the mixes are too short for 7 x 2)
            lanes = {"chunks": 2, "keep_kv": False, **({"num_rings": 3} if n >= 8 else {})}
            for hkv, kw in ((4, {"num_rings": 1}), (1, {"transport": "p2p"}), (2, lanes)):
                errs[(name, causal, hkv, tuple(kw))] = run_case(dist.group.WORLD, cu_pad, cu, causal, hkv,
                                                                options=opts, **kw)
                layout = next(reversed(scope.layouts().entries.values()))  # this case's
                dense += _dense_segments(layout, dense_rows, causal)
                lent += _lent_rows(layout)
    return errs, varlen_reference.CALLS["forward"], dense, lent


def _lent_rows(layout) -> int:
    """Query rows without a partner lent to odd spans, over the layout's varlen blocks."""
    return sum(len(s.borrowed) for b in _varlen_blocks(layout) for s in b.launch_spans.values()
               if s.borrowed is not None)


@pytest.mark.parametrize("spans", [False, True], ids=["cu_seqlens_pair", "spans_pair"])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_engine_through_the_varlen_block_is_exact(reference_ops, monkeypatch, n, spans):
    """n=2, 4, 5 and 8: every block in one varlen launch; n=3: options.packed_dense_rows=3, square segments of >= 3 rows
    of the own block of causal calls on the dense kernel (bucket-padded), the rest varlen. With a pair that takes
    spans and asks for even ones (as cuDNN's, the default on Hopper), odd spans are lent rows and it stays exact."""
    ops = varlen_reference.SPANS_OPS if spans else varlen_reference.REFERENCE_OPS
    monkeypatch.setattr(engine_thd, "_varlen_ops", lambda kernel, device, *_: ops)
    dense_rows = 3 if n == 3 else None
    lent = []
    for errs, launches, dense, rows in run_workers(_engine_worker, n, dense_rows, timeout_s=300):
        bad = {k: e for k, e in errs.items() if not e <= TOL}
        assert not bad, bad
        assert launches > 0, "the varlen block must have run"
        assert (dense > 0) == (dense_rows is not None), dense
        lent.append(rows)
    assert (sum(lent) > 0) == spans, lent  # some rank lent rows (which ones depends on the documents)


def _documents_with_real_tokens(cu_pad, cu, n: int, rank: int) -> int:
    """How many documents have a real (not padding) token in CP rank ``rank``'s chunks."""
    count = 0
    for i in range(len(cu_pad) - 1):
        chunk, real = (cu_pad[i + 1] - cu_pad[i]) // (2 * n), cu[i + 1] - cu[i]
        count += any(c * chunk < real for c in (rank, 2 * n - 1 - rank))
    return count


def _natural_worker(rank, n):
    import torch.distributed as dist

    scope = PLAN_CACHE.scope(dist.group.WORLD)
    seen = {}
    cu_pad, cu = boundaries([13, 1, 22, 6, 9], n)
    for causal in (True, False):
        for kw in ({}, {"chunks": 2}):
            varlen_reference.CALLS["spans"] = 0
            PAIR_COPIES.clear()
            err = run_case(dist.group.WORLD, cu_pad, cu, causal, 2, poison_pads=True, **kw)
            layout = next(reversed(scope.layouts().entries.values()))
            local = layout.call.local_kernel
            t = cu_pad[-1] // n
            remote = _varlen_blocks(layout)[1:]
            seen[(causal, bool(kw))] = {
                "err": err, "perm": layout.perm is not None, "full_rows": layout.call.full_rows,
                # the own block reads every row in place: one ascending run on both sides, no gather
                "local_in_place": isinstance(local, VarlenBlock) and local.q_index == slice(0, t)
                and local.k_index == local.q_index,
                # so does the remote block: its masked rows are segments with an empty partner
                "remote_in_place": bool(remote) and all(b.q_index == slice(0, t) and b.k_index == slice(0, t)
                                                        for b in remote),
                "lonely_queries": any(b.lonely_q is not None for b in remote),
                # padding pairs with nothing: one own-block pair per document with real tokens on this rank
                "local_pairs": (len(local.pairs), _documents_with_real_tokens(cu_pad, cu, n, rank)),
                # remote outputs only go to the merge: the rows of queries without keys are left unset
                "remote_merged": bool(remote) and all(b.merged for b in remote) and not getattr(local, "merged", False),
                "spans_calls": varlen_reference.CALLS["spans"], "pair_copies": len(PAIR_COPIES),
                # query rows without a partner lent to odd spans (pairs that ask for even spans)
                "lent_rows": sum(len(s.borrowed) for b in [local, *remote] if isinstance(b, VarlenBlock)
                                 for s in b.launch_spans.values() if s.borrowed is not None)}
    return seen


def test_cp2_packed_documents_run_in_their_own_order(engine_reference_ops):
    """CP=2, one chunk: no permutation into [F ; B] and back, the own block's varlen launch reads its rows in
    place, the remote block's case lives in its document masks; exact. chunks=2 keeps the [F ; B] layout."""
    ranks = run_workers(_natural_worker, 2, timeout_s=300)
    for seen in ranks:
        for (causal, chunked), got in seen.items():
            assert got["err"] <= TOL, (causal, chunked, got)
            if chunked:
                assert got["perm"] and not got["full_rows"], got
            else:
                assert not got["perm"] and got["full_rows"] and got["local_in_place"], (causal, got)
                assert got["remote_in_place"], (causal, got)
    # causal: rank 0's peer holds later chunks, seen from rank 0's back chunks only, so its front rows are
    # queries without keys (lse set to -inf); rank 1 has such rows only where a padded document's padding
    # faces no padding on rank 0's front chunk
    assert ranks[0][(True, False)]["lonely_queries"]


def test_cp2_in_place_with_a_pair_that_leaves_partnerless_rows_unset(reference_ops, monkeypatch):
    """The engine stays exact (and NaN-free) when the varlen pair leaves the rows of segments without a partner
    unset, as cuDNN's ragged kernel leaves the output rows of queries without keys: the block writes them."""
    monkeypatch.setattr(engine_thd, "_varlen_ops", lambda kernel, device, *_: varlen_reference.UNSET_OPS)
    ranks = run_workers(_natural_worker, 2, timeout_s=300)
    for seen in ranks:
        for key, got in seen.items():
            assert got["err"] <= TOL, (key, got)
    assert ranks[0][(True, False)]["lonely_queries"] and ranks[0][(True, False)]["remote_in_place"]


def test_cp2_in_place_with_a_pair_that_takes_spans(reference_ops, monkeypatch):
    """A pair that takes spans (cuDNN's) gets only the shared segments of the in-place blocks; it leaves every
    other row untouched (NaN here) and the engine stays exact and NaN-free at CP=2, causal and not. Its dK/dV of
    a received piece come as the halves of one buffer (as cuDNN's), which the backward sends on with one copy."""
    monkeypatch.setattr(engine_thd, "_varlen_ops", lambda kernel, device, *_: varlen_reference.SPANS_OPS)

    def recorded(dk, dv):
        pair = halves_of_one_buffer(dk, dv)
        if pair is not None:
            PAIR_COPIES.append(1)
        return pair

    monkeypatch.setattr(engine_backward, "halves_of_one_buffer", recorded)
    ranks = run_workers(_natural_worker, 2, timeout_s=300)
    for seen in ranks:
        for key, got in seen.items():
            assert got["err"] <= TOL, (key, got)
            assert got["spans_calls"] > 0 or key[1], key  # chunks=2 ([F ; B] order) gathers: cu_seqlens
            assert got["pair_copies"] > 0 or key[1], key
            assert got["remote_merged"], key
            assert got["local_pairs"][0] == got["local_pairs"][1], key
    assert ranks[0][(True, False)]["lonely_queries"] and ranks[0][(True, False)]["remote_in_place"]
    # rank 0 holds every document's padding: odd runs of its own block take a padded row, exactly
    assert ranks[0][(True, False)]["lent_rows"] > 0 and ranks[0][(False, False)]["lent_rows"] > 0


def test_packed_dense_rows_gets_its_own_layout(engine_reference_ops):
    """CP=1: calls that differ only in packed_dense_rows compile their own call and layout (never a stale one),
    equal options share them, and each layout's varlen block splits its segments by its own threshold."""
    clear_plan_cache()
    cu_pad, cu = boundaries([9, 2, 12, 5], 1)
    layouts = PLAN_CACHE.local.layouts()
    got = {}
    for dense_rows in (None, 6, None, 6, 100):
        err = run_case(None, cu_pad, cu, True, 2, options=TaspOptions(packed_dense_rows=dense_rows))
        assert err <= TOL, (dense_rows, err)
        layout = next(reversed(layouts.entries.values()))
        assert len(_varlen_blocks(layout)) == 1
        assert _dense_segments(layout, dense_rows, True) == {None: 0, 6: 2, 100: 0}[dense_rows]
        assert got.setdefault(dense_rows, layout) is layout  # equal options: the same layout
    assert len({id(x) for x in got.values()}) == 3 and len(layouts.entries) == 3
    assert varlen_reference.CALLS["forward"] == 5


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


@pytest.mark.parametrize("spans", [False, True], ids=["cu_seqlens_pair", "spans_pair"])
@pytest.mark.parametrize("n", [2, 3])
def test_sequence_split_through_the_varlen_block_is_exact(reference_ops, monkeypatch, n, spans):
    """packed_split='sequence' with every block on the varlen path, incl. blocks that share no document; also
    with a pair that takes spans and asks for even ones (cuDNN's)."""
    ops = varlen_reference.SPANS_OPS if spans else varlen_reference.REFERENCE_OPS
    monkeypatch.setattr(engine_thd, "_varlen_ops", lambda kernel, device, *_: ops)
    for errs, launches in run_workers(_sequence_worker, n, timeout_s=300):
        bad = {k: e for k, e in errs.items() if not e <= TOL}
        assert not bad, bad
        assert launches > 0


def test_cudnn_columns_are_kept_per_boundary_tensors():
    """The segment columns (lengths, ragged offsets) are built once per pair of boundary tensors, graph size,
    heads and stream; an in-place change of a boundary tensor builds them again; they go with the tensors."""
    import gc

    state = cudnn_varlen._CudnnRagged()
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 5, 5], dtype=torch.int32)
    cols = state._columns(cu_q, cu_k, 4, 8, 128, 32, stream=0)
    want = cudnn_varlen._CudnnRagged._build_columns(cu_q, cu_k, 4, 8, 128, 32)
    assert set(cols) == set(want) and all(torch.equal(cols[n], want[n]) for n in want)
    assert state._columns(cu_q, cu_k, 4, 8, 128, 32, stream=0) is cols
    assert state._columns(cu_q, cu_k, 4, 8, 128, 32, stream=1) is not cols  # another stream: its own copy
    assert state._columns(cu_q, cu_k, 8, 8, 128, 32, stream=0)["len_q"].numel() == 8
    cu_q[3] = 6  # in place: the version counter moves
    again = state._columns(cu_q, cu_k, 4, 8, 128, 32, stream=0)
    assert again is not cols and again["len_q"].flatten().tolist() == [3, 0, 3, 0]
    with torch.inference_mode():  # no version counter: built on every call, never kept
        inf_q = torch.tensor([0, 2], dtype=torch.int32)
        inf_k = torch.tensor([0, 2], dtype=torch.int32)
    assert state._columns(inf_q, inf_k, 1, 1, 8, 8, stream=0)["len_q"].flatten().tolist() == [2]
    assert inf_q not in state.columns
    del cu_q, cu_k, cols, again, want
    gc.collect()
    assert len(state.columns) == 0


def test_cudnn_columns_are_not_kept_during_graph_capture(monkeypatch):
    """Columns built while a CUDA graph is being captured are recorded, not written: never kept or served."""
    state = cudnn_varlen._CudnnRagged()
    cu = torch.tensor([0, 4], dtype=torch.int32)
    monkeypatch.setattr(cudnn_varlen, "_capturing", lambda t: True)
    first = state._columns(cu, cu, 1, 2, 16, 16, stream=0)
    assert state._columns(cu, cu, 1, 2, 16, 16, stream=0) is not first and len(state.columns) == 0
    monkeypatch.setattr(cudnn_varlen, "_capturing", lambda t: False)
    kept = state._columns(cu, cu, 1, 2, 16, 16, stream=0)
    assert state._columns(cu, cu, 1, 2, 16, 16, stream=0) is kept


def test_cudnn_reads_a_peers_kv_halves_in_place():
    """K/V as the two halves of one [rows, 2, h_kv, d] buffer (a received piece) are read in place at twice the
    row stride; contiguous K/V at h_kv*d; any other layout is copied first (None)."""
    pair = torch.randn(6, 2, 2, 8)
    assert cudnn_varlen._kv_row_stride(pair[:, 0], pair[:, 1]) == 32
    k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    assert cudnn_varlen._kv_row_stride(k, v) == 16
    assert cudnn_varlen._kv_row_stride(pair[:, 1], pair[:, 0]) is None  # V before K: not the engine's layout
    assert cudnn_varlen._kv_row_stride(pair[:, 0], v) is None  # strides differ
    t = torch.randn(2, 6, 8).transpose(0, 1)  # heads outermost
    assert cudnn_varlen._kv_row_stride(t, t) is None
    assert cudnn_varlen._kv_row_stride(pair[:1, 0], pair[:1, 1]) == 16  # one row: any stride reads alike

