"""Packed documents (THD) in the engine (CPU, gloo, forked ranks): exact forward and backward against a
float64 reference of document-masked attention over the whole packed sequence, padded positions exactly 0
in the output and in every gradient; the partition; stale layouts; the single document == the dense path."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_tasp import TaspConfigError, tasp_attention
from megatron_tasp.launch import run_workers
from megatron_tasp.thd import check_padded, partition_index
from megatron_tasp.topology import generic_topology
from tests.attn_reference import reference_documents, rel_err

D = 8
TOL = 1e-5


def boundaries(lengths: list[int], n: int) -> tuple[list[int], list[int]]:
    """(cu_seqlens_padded, cu_seqlens) for documents of ``lengths``, each padded to a multiple of 2n."""
    cu_pad, cu = [0], [0]
    for m in lengths:
        cu_pad.append(cu_pad[-1] + -(-m // (2 * n)) * 2 * n)
        cu.append(cu[-1] + m)
    return cu_pad, cu


def mixes(n: int, seed: int) -> dict[str, list[int]]:
    """Document mixes: short and length-1 documents, padding, one long document, an empty document."""
    rnd = random.Random(seed)
    return {
        "mixed": [1, 2 * n - 1, 0, 2 * n + 1, rnd.randint(1, 6 * n), 7 * n + 3, 1],
        "long": [16 * n - 5],
        "random": [rnd.randint(1, 5 * n) for _ in range(5)],
    }


def _pad_positions(cu_pad, cu, idx: torch.Tensor) -> torch.Tensor:
    """Local positions (of the global indices ``idx``) that are padding."""
    real = torch.zeros(cu_pad[-1], dtype=torch.bool)
    for i in range(len(cu_pad) - 1):
        real[cu_pad[i]:cu_pad[i] + cu[i + 1] - cu[i]] = True
    return torch.nonzero(~real[idx]).flatten()


def _inputs_and_reference(cu_pad, cu, causal: bool, hkv: int, seed: int):
    """Random float64 q, k, v, dout of the whole packed sequence and the reference output (with its
    gradients on the returned leaf copies qr, kr, vr)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(cu_pad[-1], h, D, generator=gen, dtype=torch.float64) for h in (4, hkv, hkv, 4))
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = reference_documents(qr, kr, vr, cu_pad, cu, causal)
    ref.backward(do)
    return q, k, v, do, ref, qr, kr, vr


def run_case(group, cu_pad, cu, causal: bool, hkv: int, dtype=torch.float32, shape4: bool = False,
             seed: int = 0, poison_pads: bool = False, **kw) -> float:
    """This rank's max relative error (out, dq, dk, dv) against the reference; asserts exact zeros at pads.
    ``poison_pads``: the incoming gradient holds huge values of both signs at padded positions (the reference's
    holds the real ones): nothing of them may reach any gradient. Finite ones: a pair that lends padded rows to
    odd spans (``VarlenOps.even_spans``) multiplies their incoming gradient by weights of exactly 0, and 0 times
    NaN is NaN (a non-finite gradient at a padded row reaches the weight gradients of the layers around
    attention anyway)."""
    import torch.distributed as dist

    n = dist.get_world_size(group) if group is not None else 1
    r = dist.get_rank(group) if group is not None else 0
    q, k, v, do, ref, qr, kr, vr = _inputs_and_reference(cu_pad, cu, causal, hkv, seed)
    idx = partition_index(torch.tensor(cu_pad, dtype=torch.int32), n, r)
    ql, kl, vl = (x[idx].to(dtype).clone() for x in (q, k, v))
    if shape4:
        ql, kl, vl = (x.unsqueeze(1) for x in (ql, kl, vl))
    ql, kl, vl = (x.requires_grad_() for x in (ql, kl, vl))
    out = tasp_attention(ql, kl, vl, group, causal=causal, cu_seqlens_padded=torch.tensor(cu_pad, dtype=torch.int32),
                         cu_seqlens=torch.tensor(cu, dtype=torch.int32), **kw)
    assert out.shape == ql.shape and out.dtype == dtype
    pads = _pad_positions(cu_pad, cu, idx)
    dout = do[idx].to(dtype)
    if poison_pads:
        dout[pads] = torch.tensor([3e4, -5e4], dtype=dtype).repeat(len(pads))[:len(pads), None, None]
    out.backward(dout.reshape(out.shape))
    got = [x.reshape(len(idx), -1, D) for x in (out.detach(), ql.grad, kl.grad, vl.grad)]
    for g in got:
        assert torch.all(g[pads] == 0), "padded positions must be exactly 0 in the output and the gradients"
    # relative to the whole reference tensor (a rank's share may be exactly 0, e.g. dq of 1-token documents;
    # so may the whole tensor, dq of 1-token documents only: then the absolute error, the inputs being O(1))
    return max(float((a.double() - b[idx]).abs().max() / (b.abs().max() if b.abs().max() > 0 else 1.0))
               for a, b in zip(got, (ref.detach(), qr.grad, kr.grad, vr.grad)))


def _configs(n: int):
    most = generic_topology(n).max_rings()
    for causal in (True, False):
        for hkv in (4, 1):
            for rings in sorted({1, most}):
                for transport in ("a2a", "p2p"):
                    yield causal, hkv, {"num_rings": rings, "transport": transport}


def _matrix_worker(rank, n, seed):
    import torch.distributed as dist

    errs = {}
    for name, lengths in mixes(n, seed).items():
        if n >= 8 and name != "mixed":  # runtime: the largest CP size runs the mix with every kind of document
            continue
        cu_pad, cu = boundaries(lengths, n)
        for causal, hkv, kw in _configs(n):
            errs[(name, causal, hkv, tuple(kw.items()))] = run_case(dist.group.WORLD, cu_pad, cu, causal, hkv, **kw)
    return errs


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_matrix(n):
    """CP sizes x causal/non-causal x MHA/MQA x ring counts (1, most) x transports (a2a, p2p) x document mixes."""
    for errs in run_workers(_matrix_worker, n, n, timeout_s=600):
        bad = {k: e for k, e in errs.items() if not e <= TOL}
        assert not bad, bad


def _options_worker(rank, n):
    import torch.distributed as dist

    cu_pad, cu = boundaries([3, 1, 8 * n + 2, 2 * n, 5], n)
    errs = [run_case(dist.group.WORLD, cu_pad, cu, causal, 2, chunks=2, keep_kv=keep)
            for causal in (True, False) for keep in (True, False)]
    errs.append(run_case(dist.group.WORLD, cu_pad, cu, True, 2, shape4=True))  # Megatron's [t, 1, h, d]
    errs += [run_case(dist.group.WORLD, cu_pad, cu, causal, 2, poison_pads=True) for causal in (True, False)]
    errs.append(run_case(dist.group.WORLD, cu_pad, cu, True, 2, dtype=torch.float64))
    bf16 = run_case(dist.group.WORLD, cu_pad, cu, True, 2, dtype=torch.bfloat16)
    return errs, bf16


@pytest.mark.parametrize("n", [3, 6])
def test_chunks_kept_kv_shapes_dtypes(n):
    """Lanes (chunks=2), kept or re-exchanged KV, [t, 1, h, d] inputs, fp64 and bf16; huge finite values in the
    incoming gradient at padded positions reach no gradient."""
    for errs, bf16 in run_workers(_options_worker, n, timeout_s=300):
        assert max(errs) <= TOL, errs
        assert bf16 <= 3e-2, bf16


def _tiny_worker(rank, n):
    import torch.distributed as dist

    rnd = random.Random(7)
    cu_pad, cu = boundaries([rnd.randint(1, 3) for _ in range(100)], n)
    return [run_case(dist.group.WORLD, cu_pad, cu, causal, 2, num_rings=rings)
            for causal in (True, False) for rings in (1, generic_topology(n).max_rings())]


@pytest.mark.parametrize("n", [3])
def test_many_tiny_documents(n):
    """100 documents of 1..3 tokens, each padded to 2·CP."""
    for errs in run_workers(_tiny_worker, n, timeout_s=300):
        assert max(errs) <= TOL, errs


def _padding_worker(rank, n):
    import torch.distributed as dist

    errs = []
    for lengths in ([1, 1, 1, 1], [2, 1, 1, 1], [1, 3 * n, 1, 1]):
        for causal in (True, False):
            for kw in ({"num_rings": 1}, {}, {"chunks": 2, "keep_kv": True}, {"keep_kv": False}):
                errs.append(run_case(dist.group.WORLD, *boundaries(lengths, n), causal, 2, **kw))
    return errs


def test_mostly_padding_skips_blocks_no_query_sees():
    """Documents of 1..2 tokens padded to 2·CP: most remote blocks hold only padding or only other
    documents' tokens for the queries that receive them; those blocks are left out after step 1."""
    for errs in run_workers(_padding_worker, 4, timeout_s=300):
        assert max(errs) <= TOL, errs


def _stale_worker(rank, n):
    import torch.distributed as dist

    layouts = [[7, 5, 9], [13, 3, 8], [1, 1, 20], [16, 12]]  # 28 padded tokens each at CP=2
    sizes = {boundaries(x, n)[0][-1] for x in layouts}
    assert len(sizes) == 1, sizes  # same shapes, other boundaries
    return [run_case(dist.group.WORLD, *boundaries(x, n), causal, 2, seed=i)
            for i, x in enumerate(layouts + layouts[:1]) for causal in (True, False)]


def test_same_shapes_other_boundaries_never_reuse_a_layout():
    for errs in run_workers(_stale_worker, 2, timeout_s=120):
        assert max(errs) <= TOL, errs


def _single_doc_worker(rank, n):
    """One document: the THD call and the sbhd call (b = 1) on the same zigzag shard give the same result."""
    import torch.distributed as dist

    s = 16 * n
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(s, h, D, generator=gen) for h in (4, 2, 2, 4))
    idx = partition_index([0, s], n, rank)
    res = []
    errs = []
    for causal in (True, False):
        for thd in (True, False):
            ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
            if thd:
                out = tasp_attention(ql, kl, vl, dist.group.WORLD, causal=causal,
                                     cu_seqlens_padded=torch.tensor([0, s], dtype=torch.int32))
            else:
                out = tasp_attention(*(x.unsqueeze(1) for x in (ql, kl, vl)), dist.group.WORLD, causal=causal)[:, 0]
            out.backward(do[idx])
            res.append([out.detach(), ql.grad, kl.grad, vl.grad])
        errs.append(max(rel_err(a, b) for a, b in zip(res[-2], res[-1])))
    return errs


@pytest.mark.parametrize("n", [2, 7])
def test_single_document_is_the_dense_path(n):
    for errs in run_workers(_single_doc_worker, n, timeout_s=120):
        assert max(errs) <= 1e-6, errs


def test_cp1_without_group():
    cu_pad, cu = boundaries([3, 1, 6, 2], 1)
    for causal in (True, False):
        assert run_case(None, cu_pad, cu, causal, 2) <= TOL


def test_cp1_takes_documents_of_any_length():
    """CP=1 holds every document whole: odd lengths need no padding (Megatron-LM's SFT dataset pads documents to
    multiples of 2*CP only when CP > 1), and the partition is the identity."""
    lengths = [3, 1, 7, 0, 5]
    cu = [0]
    for m in lengths:
        cu.append(cu[-1] + m)
    for causal in (True, False):
        assert run_case(None, cu, cu, causal, 2) <= TOL
    assert torch.equal(partition_index(cu, 1, 0), torch.arange(cu[-1]))


def test_partition_index_matches_a_direct_construction():
    rnd = random.Random(5)
    for n in (1, 2, 3, 4, 8):
        for _ in range(5):
            cu_pad, _ = boundaries([rnd.randint(0, 9 * n) for _ in range(rnd.randint(1, 6))], n)
            held = []
            for r in range(n):
                want = []
                for i in range(len(cu_pad) - 1):
                    toks = list(range(cu_pad[i], cu_pad[i + 1]))
                    c = len(toks) // (2 * n)
                    want += toks[r * c:(r + 1) * c] + toks[(2 * n - 1 - r) * c:(2 * n - r) * c]
                got = partition_index(torch.tensor(cu_pad, dtype=torch.int32), n, r)
                assert got.dtype == torch.long and got.tolist() == want
                held += want
            assert sorted(held) == list(range(cu_pad[-1]))


def test_bad_boundaries_fail_closed():
    q = torch.randn(8, 4, D)
    with pytest.raises(ValueError, match="multiple of 2\\*CP = 4"):  # CP > 1: documents padded to 2*CP
        check_padded([0, 2, 8], 2)
    with pytest.raises(TaspConfigError, match="local tokens"):
        tasp_attention(q, q, q, None, cu_seqlens_padded=torch.tensor([0, 4]))
    with pytest.raises(TaspConfigError, match="padded length"):
        tasp_attention(q, q, q, None, cu_seqlens_padded=torch.tensor([0, 4, 8]), cu_seqlens=torch.tensor([0, 5, 6]))
    with pytest.raises(TaspConfigError, match=r"\[t, heads, head_dim\]"):
        tasp_attention(q.view(4, 2, 4, D), q.view(4, 2, 4, D), q.view(4, 2, 4, D), None,
                       cu_seqlens_padded=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="multiple of 2\\*CP"):
        partition_index([0, 6], 2, 0)


def _disagree_worker(rank, n, what):
    import torch.distributed as dist

    q = torch.randn(8, 4, D)
    cu_pad = {"differ": ([0, 4, 16], [0, 8, 16]), "invalid": ([0, 4, 16], [0, 6, 16])}.get(what, ([0, 16],) * 2)[rank]
    if what == "shape" and rank == 1:
        q = q[:, 0]  # [t, d]: rejected by this rank's own checks
    try:
        tasp_attention(q, q, q, dist.group.WORLD, cu_seqlens_padded=torch.tensor(cu_pad))
    except TaspConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("what", ["differ", "invalid", "shape"])
def test_ranks_with_other_boundaries_all_raise(what):
    msgs = run_workers(_disagree_worker, 2, what, timeout_s=60)
    assert all(msgs), msgs
    if what == "differ":
        assert all("disagree on the document boundaries" in m for m in msgs), msgs
    elif what == "shape":
        assert "[t, heads, head_dim]" in msgs[1] and "rank(s) [1] rejected" in msgs[0], msgs
    else:
        assert "multiple of 2*CP" in msgs[1] and "rejected its document boundaries" in msgs[0], msgs


def test_layouts_are_a_small_lru_keyed_on_values():
    """A new set of boundaries per batch: layouts are rebuilt for new values, reused for equal ones (other
    tensors), and only the most recent few are kept."""
    from megatron_tasp import clear_plan_cache
    from megatron_tasp.engine.cache import PLAN_CACHE, Scope

    clear_plan_cache()
    q = torch.randn(16, 2, D)
    for first in range(2, 14, 2):
        tasp_attention(q, q, q, None, cu_seqlens_padded=torch.tensor([0, first, 16]))
    layouts = PLAN_CACHE.local.layouts()
    assert len(layouts.entries) == min(6, Scope.MAX_LAYOUTS)
    before = list(layouts.entries.values())
    tasp_attention(q, q, q, None, cu_seqlens_padded=torch.tensor([0, 12, 16], dtype=torch.int32))
    assert list(layouts.entries.values())[-1] is before[-1]  # same values: the same layout
    for first in range(0, 18, 2):
        tasp_attention(q, q, q, None, cu_seqlens_padded=torch.tensor([0, first, 16]))
    assert len(layouts.entries) == Scope.MAX_LAYOUTS


# ---- packed_split='sequence': the sequence split as a whole (Megatron-LM's inter-document masking) ----------
def _sequence_case(group, lengths, causal, hkv, seed=0, **kw) -> float:
    import torch.distributed as dist

    from megatron_tasp.options import parse_options
    from tests.attn_reference import zigzag_index

    n = dist.get_world_size(group)
    r = dist.get_rank(group)
    cu = [0]
    for m in lengths:
        cu.append(cu[-1] + m)
    q, k, v, do, ref, qr, kr, vr = _inputs_and_reference(cu, cu, causal, hkv, seed)
    idx = zigzag_index(cu[-1], n, r)
    ql, kl, vl = (x[idx].float().clone().requires_grad_() for x in (q, k, v))
    opts = parse_options({"packed_split": "sequence", **kw}, use_env=False)
    out = tasp_attention(ql, kl, vl, group, causal=causal, cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                         options=opts)
    out.backward(do[idx].float())
    return max(rel_err(a, b[idx]) for a, b in zip((out.detach(), ql.grad, kl.grad, vl.grad),
                                                   (ref.detach(), qr.grad, kr.grad, vr.grad)))


def _sequence_worker(rank, n):
    import torch.distributed as dist

    rnd = random.Random(n)
    total = 2 * n * 9
    mixes_ = {"one": [total], "odd": [5, 1, total - 6 - 7, 7],
              "random": [x for x in (rnd.randint(1, 3 * n) for _ in range(40))]}
    acc, out = 0, []
    for x in mixes_["random"]:  # cut to the total, the last document takes the rest
        if acc + x >= total:
            break
        out.append(x)
        acc += x
    mixes_["random"] = out + [total - acc]
    errs = {}
    for name, lengths in mixes_.items():
        for causal in (True, False):
            for hkv, kw in ((4, {}), (1, {"num_rings": 1, "transport": "p2p"})):
                errs[(name, causal, hkv)] = _sequence_case(dist.group.WORLD, lengths, causal, hkv, **kw)
    return errs


@pytest.mark.parametrize("n", [2, 3])
def test_sequence_split_documents_of_any_length(n):
    """packed_split='sequence': zigzag shards of the whole sequence, documents crossing chunk boundaries."""
    for errs in run_workers(_sequence_worker, n, timeout_s=300):
        bad = {k: e for k, e in errs.items() if not e <= TOL}
        assert not bad, bad


def test_boundaries_alone_are_never_ignored():
    """cu_seqlens without cu_seqlens_padded is a packed call (before: silently dense attention)."""
    from megatron_tasp.options import parse_options

    q = torch.randn(8, 2, D)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = tasp_attention(q, q, q, None, causal=True, cu_seqlens=cu,
                         options=parse_options({"packed_split": "sequence"}, use_env=False))
    ref = reference_documents(q.double(), q.double(), q.double(), [0, 3, 8], [0, 3, 8], True)
    assert rel_err(out, ref) <= TOL
    # the 'document' split at CP=1: any document length, the same document-masked result (not dense attention)
    out = tasp_attention(q, q, q, None, causal=True, cu_seqlens=cu)
    assert rel_err(out, ref) <= TOL
    dense = reference_documents(q.double(), q.double(), q.double(), [0, 8], [0, 8], True)
    assert rel_err(out, dense) > 1e-3
