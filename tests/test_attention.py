"""TASP attention vs float64 full attention on forked gloo ranks (CPU): forward and backward.

Tolerances: fp32 results must match the float64 reference within 1e-5 relative (max-abs error over
max-abs value). bf16 cannot be compared to float64 at a fixed tight bound; instead TASP's bf16 error
must stay within 2x the error of the SAME kernel run on the full sequence on one device plus
sqrt(n) * 2^-8: the bf16 kernels round each block's partial result (out, dq, dk, dv) to bf16 before
TASP sums the n blocks in fp32, and each rounding contributes up to half a bf16 ulp (2^-8 relative).
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_tasp import clear_plan_cache, tasp_attention
from megatron_tasp.launch import run_workers
from megatron_tasp.options import TaspOptions, reload_env
from megatron_tasp.topology import max_rings
from tests.attn_reference import contiguous_index, reference_attention, rel_err, zigzag_index


def _make(seed, seq, b, h, hkv, d, dtype):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(seq, b, hh, d, generator=gen) for hh in (h, hkv, hkv, h))
    return [x.to(dtype) for x in (q, k, v, do)]


def _case_worker(rank, n, cases):
    """Run every case on this rank; return per case the local out/dq/dk/dv (float64)."""
    import torch.distributed as dist

    results = []
    for c in cases:
        q, k, v, do = _make(c["seed"], c["seq"], c["b"], c["h"], c["hkv"], c["d"], c["dtype"])
        idx = (zigzag_index if c["causal"] else contiguous_index)(c["seq"], n, rank)
        ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
        out = tasp_attention(ql, kl, vl, dist.group.WORLD, causal=c["causal"], num_rings=c["k"],
                             transport=c.get("transport"), topology=c.get("topology"), chunks=c.get("chunks"),
                             keep_kv=c.get("keep_kv"), options=c.get("options"))
        out.backward(do[idx])
        results.append([t.detach().double() for t in (out, ql.grad, kl.grad, vl.grad)])
    return results


def _reference(c):
    q, k, v, do = _make(c["seed"], c["seq"], c["b"], c["h"], c["hkv"], c["d"], c["dtype"])
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    out = reference_attention(q, k, v, c["causal"])
    out.backward(do.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def _single_device(c):
    q, k, v, do = _make(c["seed"], c["seq"], c["b"], c["h"], c["hkv"], c["d"], c["dtype"])
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = tasp_attention(q, k, v, None, causal=c["causal"])
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def _cases(n, dtype=torch.float32):
    top = max_rings(n)
    ks = sorted({1, top, max(1, top // 2)})
    cases = []
    for i, (k, causal) in enumerate((k, c) for k in ks for c in (True, False)):
        gqa = i % 2 == 1
        blk = 2 * top + 1 if i % 3 == 0 else 3 * top  # uneven piece split on some cases
        seq = 2 * n * blk if causal else n * (2 * blk + 1)  # non-causal: odd local length
        cases.append(dict(seed=100 * n + i, seq=seq, b=2,
                          h=4, hkv=2 if gqa else 4, d=16, dtype=dtype, causal=causal, k=k,
                          transport=("p2p" if i % 2 else "a2a"), keep_kv=i % 4 in (0, 3)))
    return cases


def _check(n, cases, per_rank, tol_fn):
    names = ("out", "dq", "dk", "dv")
    for ci, c in enumerate(cases):
        ref = _reference(c)
        base = _single_device(c) if c["dtype"] != torch.float32 else None
        for rank in range(n):
            idx = (zigzag_index if c["causal"] else contiguous_index)(c["seq"], n, rank)
            for j, name in enumerate(names):
                err = rel_err(per_rank[rank][ci][j], ref[j][idx])
                tol = tol_fn(rel_err(base[j][idx], ref[j][idx]) if base is not None else None)
                assert err <= tol, (f"n={n} rank={rank} {name}: rel err {err:.2e} > {tol:.2e} for case "
                                    f"{ {k: v for k, v in c.items() if k != 'dtype'} }")


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8])
def test_fp32_matches_float64_reference(n):
    cases = _cases(n)
    per_rank = run_workers(_case_worker, n, cases)
    _check(n, cases, per_rank, lambda _: 1e-5)


def test_fp64_keeps_fp64_accumulators():
    """float64 inputs accumulate (merge, dQ, travelling dK/dV) in float64: exact to ~1e-12."""
    cases = _cases(3, torch.float64)
    per_rank = run_workers(_case_worker, 3, cases)
    _check(3, cases, per_rank, lambda _: 1e-10)


@pytest.mark.parametrize("n", [3, 4])
def test_bf16_within_single_device_error(n):
    cases = _cases(n, torch.bfloat16)[:4]
    per_rank = run_workers(_case_worker, n, cases)
    _check(n, cases, per_rank, lambda base: 2 * base + n ** 0.5 * 2.0 ** -8)


def _chunk_cases(n, dtype=torch.float32):
    """Pieces cut into 2 or 3 lanes of uneven sizes, every ring count class, both masks and transports."""
    top = max_rings(n)
    cases = []
    for i, (k, causal, c) in enumerate((k, m, c) for k in sorted({1, top}) for m in (True, False) for c in (2, 3)):
        blk = c * k + 1 + i % 2  # sub-pieces of unequal length, the shortest 1 row
        seq = 2 * n * blk if causal else n * blk
        cases.append(dict(seed=500 + 10 * n + i, seq=seq, b=1, h=4, hkv=1 if i % 2 else 4, d=8, dtype=dtype,
                          causal=causal, k=k, chunks=c, transport=("a2a" if i % 3 else "p2p"),
                          keep_kv=i % 2 == 0))
    return cases


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_chunked_lanes_match_float64_reference(n):
    cases = _chunk_cases(n)
    per_rank = run_workers(_case_worker, n, cases)
    _check(n, cases, per_rank, lambda _: 1e-5)


def test_chunked_bf16_within_single_device_error():
    cases = _chunk_cases(3, torch.bfloat16)[:2]
    per_rank = run_workers(_case_worker, 3, cases)
    _check(3, cases, per_rank, lambda base: 2 * base + 3 ** 0.5 * 2.0 ** -8)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_and_exchanged_kv_backward_agree(n, dtype):
    """The backward on KV kept from the forward (remote steps first, local block last) and the one that
    re-exchanges KV: both within the stated bound, on both masks, MHA and GQA."""
    cases = [dict(seed=900 + i, seq=(2 * n if causal else n) * 6, b=2, h=4, hkv=hkv, d=8, dtype=dtype,
                  causal=causal, k=None, keep_kv=keep)
             for i, (causal, hkv, keep) in enumerate((c, h, kp) for c in (True, False) for h in (4, 2)
                                                    for kp in (True, False))]
    per_rank = run_workers(_case_worker, n, cases)
    if dtype == torch.float32:
        _check(n, cases, per_rank, lambda _: 1e-5)
    else:
        _check(n, cases, per_rank, lambda base: 2 * base + n ** 0.5 * 2.0 ** -8)


def _retain_graph_worker(rank, n):
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(12, 1, h, 8, generator=gen, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    do = torch.randn(12, 1, 4, 8, generator=gen, dtype=torch.float64)
    out = tasp_attention(q, k, v, dist.group.WORLD, keep_kv=True)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), do)
    return [float((a - b).abs().max()) for a, b in zip(first, second)]


def test_second_backward_through_kept_kv_graph():
    """The hop home reuses a kept buffer; a retained graph's second backward must exchange KV again."""
    for diffs in run_workers(_retain_graph_worker, 3):
        assert max(diffs) < 1e-12, diffs


def _keep_kv_options_worker(rank, n):
    import torch.distributed as dist

    from megatron_tasp.attention import TaspConfigError, tasp_run_summary

    q = torch.randn(8, 1, 4, 8)
    kv = torch.randn(8, 1, 2, 8)
    g = dist.group.WORLD
    res = {"auto": tasp_run_summary(q, kv, kv, g)["keep_kv"], "off": tasp_run_summary(q, kv, kv, g,
                                                                                       keep_kv=False)["keep_kv"]}
    tiny = TaspOptions(keep_kv_cap_mib=1e-6)  # 'auto' keeps nothing over a cap this small
    res["auto_capped"] = tasp_run_summary(q, kv, kv, g, options=tiny)["keep_kv"]
    res["errors"] = []
    for kw in ({"keep_kv": "sometimes"}, {"keep_kv": True, "transport": "symm"}):
        try:
            tasp_attention(q, kv, kv, g, **kw)
            res["errors"].append(None)
        except TaspConfigError as exc:
            res["errors"].append(str(exc))
    return res


def test_keep_kv_resolution_and_fail_closed():
    res = run_workers(_keep_kv_options_worker, 2)[0]
    assert res["auto"] is True and res["off"] is False and res["auto_capped"] is False
    assert "keep_kv must be True, False or 'auto'" in res["errors"][0]
    assert "symm" in res["errors"][1] and "keep_kv=False" in res["errors"][1]


def _chunk_error_worker(rank, n):
    import torch.distributed as dist

    from megatron_tasp.attention import TaspConfigError

    q = torch.randn(8, 1, 2, 8)
    msgs = []
    for kw in ({"chunks": 5}, {"chunks": 0}, {"chunks": "many"}):
        try:
            tasp_attention(q, q, q, dist.group.WORLD, causal=True, **kw)
            msgs.append(None)
        except TaspConfigError as exc:
            msgs.append(str(exc))
    return msgs


def test_bad_chunks_fail_closed():
    msgs = run_workers(_chunk_error_worker, 2)[0]
    assert "too short for 1 rings x 5 chunks" in msgs[0] and "chunks <= 4" in msgs[0], msgs
    assert all(m and "chunks" in m for m in msgs[1:]), msgs


def _timeout_worker(rank, n):
    import time

    import torch.distributed as dist

    q = torch.randn(8, 1, 2, 8)
    opts = TaspOptions(timeout_s=2)
    tasp_attention(q, q, q, dist.group.WORLD, causal=True, options=opts)  # both ranks take part once
    if rank == 1:
        time.sleep(6)  # then stays silent past rank 0's 2 s timeout
        return "silent"
    try:
        tasp_attention(q, q, q, dist.group.WORLD, causal=True, options=opts)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_silent_peer_times_out_with_step_and_group():
    res = run_workers(_timeout_worker, 2, timeout_s=60)
    assert "step 0" in res[0] and "CP group ranks [0, 1]" in res[0], res[0]


def _errors_worker(rank, n):
    import torch.distributed as dist

    from megatron_tasp.attention import TaspConfigError

    msgs = []
    g = dist.group.WORLD
    bad = [
        (torch.randn(7, 1, 4, 8), torch.randn(7, 1, 2, 8), {}),  # odd local length, causal
        (torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), {"num_rings": 2}),  # too short for 2 rings
        (torch.randn(8, 1, 3, 8), torch.randn(8, 1, 2, 8), {}),  # heads not a multiple
        (torch.randn(8, 1, 4, 8), torch.randn(8, 1, 2, 4), {}),  # head dim mismatch
        (torch.randn(8, 1, 4, 8), torch.randn(8, 1, 2, 8), {"num_rings": 9}),  # more rings than exist
        (torch.randn(8, 1, 4, 8), torch.randn(8, 1, 2, 8), {"topology": "h100-sxm-8"}),  # size mismatch
        (torch.randn(8, 1, 4, 8), torch.randn(8, 1, 2, 8), {"transport": "carrier-pigeon"}),
    ]
    for q, kv, kw in bad:
        try:
            tasp_attention(q, kv, kv.clone(), g, **kw)
            msgs.append(None)
        except (TaspConfigError, ValueError) as exc:
            msgs.append(str(exc))
    return msgs


def test_bad_inputs_fail_closed():
    msgs = run_workers(_errors_worker, 4)[0]
    assert all(m is not None for m in msgs), msgs
    assert "even local length" in msgs[0]
    assert "too short for 2 rings" in msgs[1]
    assert "multiple of KV heads" in msgs[2]
    assert "head dim" in msgs[3]
    assert "at most" in msgs[4]
    assert "h100-sxm-8" in msgs[5] and "4 ranks" in msgs[5]
    assert "transport" in msgs[6]


def test_cp1_is_plain_attention():
    c = dict(seed=1, seq=24, b=1, h=4, hkv=2, d=8, dtype=torch.float32, causal=True, k=None)
    got = _single_device(c)
    ref = _reference(c)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("u,g", [(2, 2), (2, 4), (3, 2)])
def test_multinode_rings_emulated(u, g):
    """u nodes x g ranks on CPU: path-chained rings from a multi-node topology, placement from the hosts option."""
    hosts = TaspOptions(hosts=tuple(f"node{r // g}" for r in range(u * g)))
    n = u * g
    from megatron_tasp.topology import topology_from_dict

    topo = topology_from_dict({"name": f"test-{u}x{g}", "nodes": u, "gpus_per_node": g,
                               "inter_node": {"nic_GBps": 50}})
    cases = [dict(seed=7, seq=2 * n * 2 * g, b=1, h=4, hkv=2, d=8, dtype=torch.float32, causal=True,
                  k=g, topology=topo, options=hosts),
             dict(seed=8, seq=n * 3 * g, b=1, h=2, hkv=2, d=8, dtype=torch.float32, causal=False,
                  k=g // 2 or 1, topology=topo, options=hosts)]
    per_rank = run_workers(_case_worker, n, cases)
    _check(n, cases, per_rank, lambda _: 1e-5)


def _options_worker(rank, n):
    import torch.distributed as dist

    from megatron_tasp.attention import TaspConfigError, tasp_run_summary
    from megatron_tasp.topology import topology_from_dict

    q = torch.randn(8, 1, 4, 8)
    kv = torch.randn(8, 1, 2, 8)
    g = dist.group.WORLD
    out = {"auto": tasp_run_summary(q, kv, kv, g, num_rings="auto", chunks="auto"),
           "env": None, "errors": []}
    os.environ["MEGATRON_TASP_CHUNKS"] = "2"  # the environment sets the defaults, read once: reload both
    reload_env()
    clear_plan_cache()
    try:
        out["env"] = tasp_run_summary(q, kv, kv, g)
    finally:
        del os.environ["MEGATRON_TASP_CHUNKS"]
        reload_env()
        clear_plan_cache()
    two_nodes = topology_from_dict({"name": "t-2x2", "nodes": 2, "gpus_per_node": 2, "inter_node": {"nic_GBps": 50}})
    for kw in ({"transport": "symm"}, {"transport": "symm", "topology": two_nodes}):
        try:
            tasp_attention(q, kv, kv, g, **kw)
            out["errors"].append(None)
        except (TaspConfigError, ValueError) as exc:
            out["errors"].append(str(exc))
    return out


def test_run_summary_auto_env_and_symm_fails_closed_on_cpu():
    res = run_workers(_options_worker, 4)[0]
    assert res["auto"] == {"cp": 4, "num_rings": res["auto"]["num_rings"], "transport": "a2a", "chunks": 1,
                           "keep_kv": True, "kernel": res["auto"]["kernel"]}
    assert res["env"]["chunks"] == 2 and res["env"]["num_rings"] == max_rings(4)
    assert "needs CUDA" in res["errors"][0] and "use 'a2a' or 'p2p'" in res["errors"][0]
    assert "needs one node" in res["errors"][1] and "p2p" in res["errors"][1]


def test_cp2_merge_in_place_and_into_a_fresh_output_both_exact():
    """CP=2 merges in place into the local kernel's output when that has the output's layout (the CPU kernel
    returns it so), and into a fresh output otherwise (the math kernel returns contiguous bhsd): both paths,
    causal (rows without a remote block) and not, fp32 within 1e-5 of float64."""
    from megatron_tasp.engine.compiled import bhsd
    from megatron_tasp.engine.forward import in_output_layout
    from megatron_tasp.kernels import get_kernel

    q = torch.randn(16, 2, 4, 8)
    seen = {}
    for name in ("cpu", "math"):
        out0, _, _ = get_kernel(name, q.device, q.dtype, 8).forward_unchecked(
            bhsd(q), bhsd(q), bhsd(q), causal=True, scale=0.3)
        seen[name] = in_output_layout(out0, q)
    assert seen == {"cpu": True, "math": False}, seen  # both paths are exercised below
    cases = [dict(seed=7 + i, seq=24, b=2, h=4, hkv=2, d=16, dtype=torch.float32, causal=causal, k=1,
                  options=TaspOptions(kernel=kernel), keep_kv=i % 2 == 0)
             for i, (kernel, causal) in enumerate((kn, c) for kn in ("cpu", "math") for c in (True, False))]
    per_rank = run_workers(_case_worker, 2, cases)
    _check(2, cases, per_rank, lambda _: 1e-5)
