"""The engine's state and checks (CPU, gloo, forked ranks): one plan cache keyed by the group's ranks (the
re-layout hang), the first call's cross-rank agreement, option validation identical at CP=1 and CP>1, the
deprecated ``backend=`` alias."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_tasp import TaspConfigError, clear_plan_cache, tasp_attention, tasp_run_summary
from megatron_tasp.engine.cache import PLAN_CACHE, PlanCache
from megatron_tasp.launch import run_workers
from tests.attn_reference import reference_attention, rel_err, zigzag_index

SEQ, B, H, HKV, D = 32, 1, 4, 2, 8


def _global(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SEQ, B, h, D, generator=gen, dtype=torch.float64) for h in (H, HKV, HKV, H)]


def _reference(seed):
    q, k, v, do = _global(seed)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = reference_attention(q, k, v, True)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def _step(group, seed, **kw):
    """Forward + backward of this rank's zigzag shard on ``group``; the errors against the reference."""
    import torch.distributed as dist

    n, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, do = _global(seed)
    idx = zigzag_index(SEQ, n, r)
    ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
    out = tasp_attention(ql, kl, vl, group, **kw)
    out.backward(do[idx])
    ref = _reference(seed)
    return max(rel_err(a, b[idx]) for a, b in zip((out.detach(), ql.grad, kl.grad, vl.grad), ref))


def _relayout_worker(rank, n):
    """Three CP layouts in one process: [0,1]/[2,3], then [0,2]/[1,3], then [0,1]/[2,3] created again.
    Between layouts every group is destroyed (Megatron's destroy_model_parallel)."""
    import torch.distributed as dist

    errs = []
    for layout in ([[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 1], [2, 3]]):
        groups = [dist.new_group(ranks) for ranks in layout]  # every rank creates every group, in order
        mine = next(g for g, ranks in zip(groups, layout) if rank in ranks)
        for seed in (1, 2):
            errs.append(_step(mine, seed))
            errs.append(_step(mine, seed, keep_kv=False, chunks=2))
        for g in groups:
            dist.destroy_process_group(g)
    return errs


def test_relayout_in_one_process_does_not_hang():
    """The length check used to be remembered under (rings, rank in group, length): after a new layout some
    ranks skipped its all-reduce while their peers entered it. Keyed by the group's ranks now."""
    for errs in run_workers(_relayout_worker, 4, timeout_s=240):
        assert max(errs) < 1e-10, errs


def _disagree_worker(rank, n, what):
    import torch.distributed as dist

    hkv = {"heads": (2, 4)[rank], "dtype": 2, "rings": 2, "ndim": 2}[what]
    dtype = torch.float64 if what == "dtype" and rank == 1 else torch.float32
    q, k = torch.randn(8, 1, 4, 8, dtype=dtype), torch.randn(8, 1, hkv, 8, dtype=dtype)
    if what == "ndim" and rank == 1:
        q = q[:, 0]  # 3-D: rejected by this rank's own input checks, before the agreement
    kw = {"num_rings": 99} if what == "rings" and rank == 1 else {}
    try:
        tasp_attention(q, k, k.clone(), dist.group.WORLD, **kw)
    except TaspConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("what", ["heads", "dtype", "rings", "ndim"])
def test_ranks_that_disagree_all_raise(what):
    """Every rank raises, naming what differs (or which rank rejected its own options): none returns."""
    msgs = run_workers(_disagree_worker, 2, what, timeout_s=120)
    assert all(msgs), msgs
    if what == "heads":
        assert all("KV heads (2 .. 4" in m for m in msgs), msgs
    elif what == "dtype":
        assert all("dtype (float32 .. float64" in m for m in msgs), msgs
    elif what == "rings":
        assert "at most" in msgs[1] and "rank(s) [1] rejected" in msgs[0], msgs
    else:
        assert "4-D tensor" in msgs[1] and "rank(s) [1] rejected" in msgs[0], msgs


_BAD_OPTIONS = [({"num_rings": 99}, "at most"), ({"transport": "bogus"}, "transport"),
                ({"topology": "nope"}, "nope"), ({"keep_kv": "maybe"}, "keep_kv"),
                ({"kernel": "bogus"}, "unknown attention kernel"), ({"num_rings": 2}, "at most 1")]


def _cp1_errors(group):
    q = torch.randn(8, 1, 4, 8)
    msgs = []
    for kw, _ in _BAD_OPTIONS:
        try:
            tasp_attention(q, q, q, group, **kw)
            msgs.append(None)
        except TaspConfigError as exc:
            msgs.append(str(exc))
    return msgs


def _cp1_group_worker(rank, n):
    import torch.distributed as dist

    return _cp1_errors(dist.group.WORLD), _cp1_errors(None)


def test_cp1_validates_options_like_cp_greater_than_1():
    for msgs in (*run_workers(_cp1_group_worker, 1)[0], _cp1_errors(None)):
        for m, (kw, want) in zip(msgs, _BAD_OPTIONS):
            assert m is not None and want in m, (kw, m)


def _cp2_bad_options_worker(rank, n):
    import torch.distributed as dist

    q = torch.randn(8, 1, 4, 8)
    msgs = []
    for kw, _ in _BAD_OPTIONS[:5]:
        try:
            tasp_attention(q, q, q, dist.group.WORLD, **kw)
            msgs.append(None)
        except TaspConfigError as exc:
            msgs.append(str(exc))
    return msgs


def test_cp2_rejects_the_same_options():
    for msgs in run_workers(_cp2_bad_options_worker, 2):
        for m, (kw, want) in zip(msgs, _BAD_OPTIONS):
            assert m is not None and want in m, (kw, m)


def test_backend_is_a_deprecated_alias_of_kernel():
    q = torch.randn(8, 1, 2, 8)
    with pytest.warns(DeprecationWarning, match="kernel="):
        assert tasp_run_summary(q, q, q, None, backend="math")["kernel"] == "math"
    with pytest.raises(TaspConfigError, match="backend= is its deprecated alias"):
        tasp_attention(q, q, q, None, backend="math", kernel="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tasp_run_summary(q, q, q, None, kernel="math")["kernel"] == "math"


def test_plan_cache_is_bounded_and_clears():
    cache = PlanCache(max_entries=3)
    for i in range(5):
        cache.local.put(("x", i), i)
    assert len(cache) == 3 and cache.local.get(("x", 0)) is None and cache.local.get(("x", 4)) == 4
    cache.clear()
    assert len(cache) == 0
    q = torch.randn(8, 1, 2, 8)
    tasp_attention(q, q, q, None)
    assert len(PLAN_CACHE) > 0
    clear_plan_cache()
    assert len(PLAN_CACHE) == 0


def _scope_worker(rank, n):
    import torch.distributed as dist

    g1 = dist.new_group([0, 1])
    s1 = PLAN_CACHE.scope(g1)
    same = PLAN_CACHE.scope(g1) is s1
    dist.destroy_process_group(g1)
    g2 = dist.new_group([0, 1])  # same ranks, a new group: a new scope (the old plans hold the old group)
    s2 = PLAN_CACHE.scope(g2)
    return same, s2 is not s1, s1.ranks == s2.ranks == (0, 1)


def test_scope_keyed_by_ranks_and_renewed_with_the_group():
    for res in run_workers(_scope_worker, 2):
        assert all(res), res


def _calibration_worker(rank, n, root):
    import os

    import torch.distributed as dist

    from megatron_tasp.options import TaspOptions

    here = os.path.join(root, f"rank{rank}")
    os.makedirs(here, exist_ok=True)
    os.chdir(here)  # the same relative path names a file on rank 0 only, as on a node without the file
    if rank == 0:
        import json

        from megatron_tasp.costmodel.params import DEFAULT_CALIBRATION_DICT
        with open("cal.json", "w") as fh:
            json.dump(DEFAULT_CALIBRATION_DICT, fh)
    q = torch.randn(8, 1, 2, 8)
    try:
        tasp_attention(q, q.clone(), q.clone(), dist.group.WORLD,
                       options=TaspOptions(num_rings="auto", calibration="cal.json"))
    except ValueError as exc:  # the rank without the file raises its own error, its peer a TaspConfigError
        return str(exc)
    return None


def test_calibration_missing_on_one_rank_makes_every_rank_raise(tmp_path):
    """A cost-model file some ranks cannot read is found before the agreement, so its peers raise too."""
    msgs = run_workers(_calibration_worker, 2, str(tmp_path), timeout_s=120)
    assert all(msgs), msgs
    assert "not found" in msgs[1] and "rank(s) [1] rejected" in msgs[0], msgs
