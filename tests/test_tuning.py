"""Automatic ring count: choose_num_rings / choose_transport properties, the probe, and
``tasp_attention(num_rings="auto")`` on forked gloo ranks against the float64 reference."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from megatron_tasp import costmodel as cm
from megatron_tasp import tasp_attention, tuning
from megatron_tasp.launch import run_workers
from megatron_tasp.options import TaspOptions, reload_env
from megatron_tasp.topology import generic_topology, list_presets, load_topology, topology_from_dict
from tests.attn_reference import contiguous_index, reference_attention, rel_err, zigzag_index


def _hint(tokens, hkv=32, causal=True, **kw):
    return {"tokens_per_gpu": tokens, "batch": 1, "heads_q": 32, "heads_kv": hkv, "head_dim": 128,
            "causal": causal, "dtype_bytes": 2, **kw}


@pytest.fixture(autouse=True)
def _clean(no_tasp_env):
    tuning.clear_caches()
    yield
    tuning.clear_caches()


@pytest.mark.parametrize("name", list_presets())
def test_choice_is_a_ring_count_the_topology_builds(name):
    topo = load_topology(name)
    offered = cm.ring_counts(topo)
    for tokens in (2, 64, 8192) if topo.world_size > 32 else (2, 64, 1024, 8192, 65536):
        for hkv in (32, 8):
            for causal in (True, False):
                k = tuning.choose_num_rings(topo, _hint(tokens, hkv, causal))
                assert k in offered and k <= topo.max_rings()
                assert k <= (tokens // 2 if causal else tokens)  # every piece gets tokens
                if topo.world_size == 2:
                    assert k == 1


def test_two_ranks_and_hopeless_hints_give_one_ring():
    assert tuning.choose_num_rings(load_topology("h100-nv18-2"), _hint(65536)) == 1
    assert tuning.choose_num_rings(generic_topology(2), {}) == 1
    assert tuning.choose_num_rings(load_topology("mi300x-8"), {"heads_q": 32}) == 1  # no tokens: ring
    assert tuning.choose_num_rings(load_topology("mi300x-8"), _hint(1024, causal=True, heads_kv=5)) == 1


def test_picks_multi_ring_only_where_the_model_predicts_a_clear_gain():
    mesh, switch, two = (load_topology(n) for n in ("mi300x-8", "h100-sxm-8", "h100-sxm-8x2"))
    assert tuning.choose_num_rings(mesh, _hint(8192)) > 1  # comm-bound MHA on 64 GB/s links
    assert tuning.choose_num_rings(two, _hint(8192)) > 1  # NIC-bound 1-ring baseline
    assert tuning.choose_num_rings(switch, _hint(8192)) == 1  # one peer already uses the whole egress
    assert tuning.choose_num_rings(mesh, _hint(1024)) == 1  # host-bound: more pieces only cost
    assert tuning.choose_num_rings(mesh, _hint(8192), margin=10.0) == 1  # margin keeps the ring schedule


def test_choice_is_never_predicted_slower_than_one_ring():
    """Also not with ideal overlap (interference 0), the least certain parameter."""
    cal = tuning.calibration()
    for name in ("mi300x-8", "h100-sxm-8x2", "pcie-8", "h100-sxm-8"):
        topo = load_topology(name)
        for tokens in (1024, 4096, 16384, 65536):
            hint = _hint(tokens)
            k = tuning.choose_num_rings(topo, hint)
            shape = tuning.shape_from_hint(hint)
            for c in (cal, replace(cal, interference=0.0)):
                t1 = cm.predict(topo, shape, 1, c).total_ms
                tk = cm.predict(topo, shape, k, c).total_ms
                assert k == 1 or tk * (1 + tuning.DEFAULT_MARGIN) < t1, (name, tokens, k)


def test_cached_after_first_call(monkeypatch):
    topo = load_topology("h100-sxm-8x2")
    hint = _hint(12288, hkv=8)
    first = tuning.choose_num_rings(topo, hint)
    calls = []
    monkeypatch.setattr(tuning, "predict", lambda *a, **k: calls.append(1))
    t0 = time.perf_counter()
    for _ in range(100):
        assert tuning.choose_num_rings(topo, dict(hint)) == first
    per_call = (time.perf_counter() - t0) / 100
    assert not calls and per_call < 1e-3


def test_calibration_from_options(tmp_path, monkeypatch):
    topo = load_topology("mi300x-8")
    hint = _hint(8192)
    assert tuning.choose_num_rings(topo, hint) > 1
    slow_host = cm.Calibration.from_dict({**cm.DEFAULT_CALIBRATION_DICT, "host_piece_frac_fwd": 5.0,
                                          "host_piece_frac_bwd": 5.0, "host_prefix_ms": 1e4})
    path = tmp_path / "cal.json"
    slow_host.save(path)
    opts = TaspOptions(calibration=path)
    assert tuning.calibration(opts) == slow_host
    assert tuning.choose_num_rings(topo, hint, options=opts) == 1  # host cost per extra ring dominates now
    assert tuning.choose_num_rings(topo, hint) > 1  # the default options still use the shipped constants
    missing = TaspOptions(calibration=tmp_path / "missing.json")
    with pytest.raises(cm.CostModelError, match="not found"):
        tuning.calibration(missing)
    monkeypatch.setenv("MEGATRON_TASP_CALIBRATION", str(path))  # the environment reaches tuning via options only
    reload_env()
    assert tuning.calibration() == slow_host


def test_choose_transport():
    for name in ("mi300x-8", "h100-sxm-8x2", "h100-sxm-8"):
        topo = load_topology(name)
        for tokens in (1024, 16384):
            tr = tuning.choose_transport(topo, _hint(tokens))
            assert tr in ("a2a", "p2p")
    # a2a stages pieces through an extra copy when ring order differs from peer order; p2p does not
    topo = load_topology("mi300x-8")
    k = max(cm.ring_counts(topo))
    assert tuning.choose_transport(topo, _hint(32768), k) in ("a2a", "p2p")


# ------------------------------------------------------------------------------------------------
# On forked gloo ranks


def _auto_worker(rank, n, cases):
    import torch.distributed as dist

    out = []
    for c in cases:
        gen = torch.Generator().manual_seed(c["seed"])
        q, k, v, do = (torch.randn(c["seq"], 2, h, 16, generator=gen) for h in (4, c["hkv"], c["hkv"], 4))
        idx = (zigzag_index if c["causal"] else contiguous_index)(c["seq"], n, rank)
        ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
        res = tasp_attention(ql, kl, vl, dist.group.WORLD, causal=c["causal"], num_rings="auto",
                             topology=c.get("topology"))
        res.backward(do[idx])
        hint = {"tokens_per_gpu": ql.shape[0], "batch": 2, "heads_q": 4, "heads_kv": c["hkv"], "head_dim": 16,
                "causal": c["causal"], "dtype_bytes": 4}
        topo = c.get("topology") or generic_topology(n)
        out.append((tuning.choose_num_rings(topo, hint), [t.detach().double() for t in
                                                        (res, ql.grad, kl.grad, vl.grad)]))
    return out


def _slow_mesh(n):
    """A full mesh whose links are so slow that the model must spread KV over every ring."""
    return topology_from_dict({"name": f"slow-mesh-{n}", "nodes": 1, "gpus_per_node": n,
                               "intra_node": {"fabric": "full_mesh", "gpu_egress_GBps": 0.001 * (n - 1),
                                              "peer_GBps": 0.001}})


@pytest.mark.parametrize("n", [3, 4])
def test_auto_num_rings_matches_float64_reference(n):
    cases = [dict(seed=1, seq=2 * n * 6, hkv=2, causal=True),
             dict(seed=2, seq=n * 9, hkv=4, causal=False),
             dict(seed=3, seq=2 * n * 6, hkv=2, causal=True, topology=_slow_mesh(n)),
             dict(seed=4, seq=n * 9, hkv=2, causal=False, topology=_slow_mesh(n))]
    per_rank = run_workers(_auto_worker, n, cases)
    for ci, c in enumerate(cases):
        gen = torch.Generator().manual_seed(c["seed"])
        q, k, v, do = (torch.randn(c["seq"], 2, h, 16, generator=gen) for h in (4, c["hkv"], c["hkv"], 4))
        q, k, v = (x.double().requires_grad_() for x in (q, k, v))
        ref = reference_attention(q, k, v, c["causal"])
        ref.backward(do.double())
        want = [ref.detach(), q.grad, k.grad, v.grad]
        chosen = {per_rank[r][ci][0] for r in range(n)}
        assert len(chosen) == 1
        if "topology" in c:  # slow links: the model spreads the KV over every ring it can build
            assert chosen == {max(cm.ring_counts(c["topology"]))} and max(chosen) > 1
        for r in range(n):
            idx = (zigzag_index if c["causal"] else contiguous_index)(c["seq"], n, r)
            for j in range(4):
                assert rel_err(per_rank[r][ci][1][j], want[j][idx]) < 1e-5, (n, ci, r, j)


def _probe_worker(rank, n, auto):
    import torch.distributed as dist

    hint = {"tokens_per_gpu": 12, "batch": 1, "heads_q": 2, "heads_kv": 2, "head_dim": 8, "causal": True,
            "dtype_bytes": 4}
    topo = generic_topology(n)
    if auto:
        got = tuning.choose_num_rings(topo, hint, group=dist.group.WORLD, options=TaspOptions(auto_probe=True),
                                      attention=tasp_attention)
    else:
        got = tuning.probe_num_rings(dist.group.WORLD, [1, 2], hint, iters=2, attention=tasp_attention)
    return got, tuning.choose_num_rings(topo, hint)


@pytest.mark.parametrize("auto", [False, True])
def test_probe_times_candidates_on_the_group(auto):
    res = run_workers(_probe_worker, 3, auto)
    picks = {r[0] for r in res}
    assert len(picks) == 1 and picks <= {1, 2}  # every rank agrees (max over ranks)
    assert all(r[1] == r[0] for r in res)  # remembered for choose_num_rings


def test_choose_chunks_one_on_the_measured_node_and_more_when_comm_dominates(monkeypatch):
    from megatron_tasp.costmodel import default_calibration

    topo = generic_topology(2)
    hint = {"tokens_per_gpu": 8192, "heads_q": 32, "heads_kv": 32, "head_dim": 128, "causal": True}
    assert tuning.choose_chunks(topo, hint, 1) == 1  # as measured on 2x H100: lanes never paid
    slow = replace(default_calibration(), link_efficiency=0.02, host_fwd_ms=0.01, host_bwd_ms=0.01,
                   host_prefix_ms=0.0)
    monkeypatch.setattr(tuning, "calibration", lambda options=None: slow)
    assert tuning.choose_chunks(topo, hint, 1) in (2, 4)  # a 50x slower link: most of the last hop is exposed
    assert tuning.choose_chunks(topo, {**hint, "tokens_per_gpu": 2}, 1) == 1  # too short to split


def test_caches_are_bounded_and_keyed_by_value():
    """Equal topologies and calibrations share cache entries (no id() in keys); every cache has a bound."""
    hint = _hint(8192)
    a, b = load_topology("mi300x-8"), load_topology("mi300x-8")
    assert a is not b and a == b
    tuning.choose_num_rings(a, hint)
    before = tuning._model_choice.cache_info()
    tuning.choose_num_rings(b, dict(hint), options=TaspOptions())
    after = tuning._model_choice.cache_info()
    assert after.hits == before.hits + 1 and after.currsize == before.currsize
    for fn in (tuning._model_choice, tuning._transport_choice, tuning._chunks_choice, tuning._load_calibration):
        assert fn.cache_info().maxsize is not None


def test_choice_path_imports_no_torch_numpy_or_fitting():
    import subprocess
    import sys

    code = ("import sys; from megatron_tasp import tuning; from megatron_tasp.topology import load_topology; "
            "tuning.choose_num_rings(load_topology('mi300x-8'), {'tokens_per_gpu': 8192}); "
            "tuning.choose_chunks(load_topology('mi300x-8'), {'tokens_per_gpu': 8192}, 1); "
            "bad = [m for m in ('torch', 'numpy', 'scipy', 'megatron_tasp.costmodel.fitting', "
            "'megatron_tasp.attention', 'megatron_tasp.engine') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
