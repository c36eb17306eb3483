"""``options.cuda_graphs`` (megatron_tasp.engine.graphed) on CPU: the graphed path with a stand-in capturer whose
"replay" runs the captured function again and copies the results into the first run's tensors, as a CUDA
graph replay writes the same memory. Several "layers" of one signature interleave (forward a, b, c, then the
backward of all), so an output handed out from static memory, or a saved tensor not copied back before a
backward replay, shows up as a wrong result. The real capture runs on GPU (scripts/gpu_graph_check.py
--internal)."""

from __future__ import annotations

import pytest
import torch

import megatron_tasp.engine.graphed as graphed_mod
from megatron_tasp import clear_plan_cache, tasp_attention
from megatron_tasp.engine.cache import PLAN_CACHE
from megatron_tasp.launch import run_workers
from megatron_tasp.options import TaspOptions, parse_options
from tests.attn_reference import zigzag_index

COUNTS = {"captures": 0, "replays": 0, "warm": 0}


def _copy_into(static, fresh) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif isinstance(static, (list, tuple)):
        for s, f in zip(static, fresh):
            _copy_into(s, f)


class Rerun:
    """Stand-in capturer: replay = run again, results copied into the captured outputs."""

    def warm(self, fn, times):
        COUNTS["warm"] += times
        for _ in range(times):
            fn()

    def capture(self, fn):
        COUNTS["captures"] += 1
        outs = fn()

        def replay():
            COUNTS["replays"] += 1
            _copy_into(outs, fn())
        return replay, outs


@pytest.fixture
def rerun_capturer(monkeypatch):
    COUNTS.update(captures=0, replays=0, warm=0)
    monkeypatch.setattr(graphed_mod, "_new_capturer", lambda device: Rerun())


def _layers(rank, n, graphs, causal, hkv, keep_kv, chunks=1, fused=False):
    """Three calls of one signature (forward a, b, c; one backward through all), and a second backward
    through c (retain_graph); returns outputs and gradients (float64) and the stand-in's counts. ``fused``:
    q, k, v are strided views of one fused tensor (as Megatron splits its QKV projection)."""
    import torch.distributed as dist

    clear_plan_cache()
    opts = TaspOptions(cuda_graphs=graphs, keep_kv=keep_kv, chunks=chunks)
    seq, h, d = 8 * n, 4, 8
    gen = torch.Generator().manual_seed(11)
    idx = zigzag_index(seq, n, rank) if causal else torch.arange(rank * seq // n, (rank + 1) * seq // n)
    layers = []
    for _ in range(3):
        if fused:
            qkv = torch.randn(seq, 1, h + 2 * hkv, d, generator=gen)[idx].clone().requires_grad_()
            q, k, v = qkv[:, :, :h], qkv[:, :, h:h + hkv], qkv[:, :, h + hkv:]
            q.retain_grad(), k.retain_grad(), v.retain_grad()
            layers.append([q, k, v, torch.randn(seq, 1, h, d, generator=gen)[idx].clone()])
            continue
        q, k, v, do = (torch.randn(seq, 1, hh, d, generator=gen)[idx].clone() for hh in (h, hkv, hkv, h))
        layers.append([x.requires_grad_(i < 3) for i, x in enumerate((q, k, v, do))])
    outs = [tasp_attention(q, k, v, dist.group.WORLD, causal=causal, options=opts) for q, k, v, _ in layers]
    torch.autograd.backward(outs, [layer[3] for layer in layers], retain_graph=True)
    got = [[o.detach().double()] + [x.grad.double() for x in layer[:3]] for o, layer in zip(outs, layers)]
    again = torch.autograd.grad(outs[2], layers[2][:3], layers[2][3])
    call = next(c for c in PLAN_CACHE.scope(dist.group.WORLD).entries.values() if hasattr(c, "cuda_graphs"))
    return got, [g.double() for g in again], dict(COUNTS), call.graphed is not None, call.keep_kv


@pytest.mark.parametrize("n,causal,hkv,keep_kv,chunks,fused", [
    (2, True, 2, True, 1, False), (2, True, 4, False, 1, False), (2, False, 1, "auto", 1, False),
    (3, True, 2, True, 1, False), (3, True, 2, False, 2, False), (2, True, 2, "auto", 1, True)])
def test_graphed_calls_equal_eager_calls(rerun_capturer, n, causal, hkv, keep_kv, chunks, fused):
    """Exactly the eager results, forward and backward, for every layer; the first call eager, the second
    captures forward and backward (after a warm-up), every later one replays; a second backward through a
    replayed call (retain_graph) runs eagerly and equals the first. CP 2 and 3 (where the kept last piece
    carries the fp32 accumulator home), two chunks, and q/k/v as strided views of one fused tensor."""
    eager = run_workers(_layers, n, False, causal, hkv, keep_kv, chunks, fused, timeout_s=120)
    graph = run_workers(_layers, n, True, causal, hkv, keep_kv, chunks, fused, timeout_s=120)
    for (e_got, e_again, e_counts, e_made, _), (g_got, g_again, g_counts, g_made, kept) in zip(eager, graph):
        assert not e_made and e_counts["captures"] == 0
        assert g_made and g_counts["captures"] == 2 and g_counts["warm"] == graphed_mod.WARMUP
        # forwards of layers b and c replay, backwards of b and c replay (layer a ran eagerly); the second
        # backward through c replays too unless the forward kept KV (the first backward consumed it)
        assert g_counts["replays"] == (4 if kept else 5), g_counts
        for e_layer, g_layer in zip(e_got, g_got):
            for a, b in zip(g_layer, e_layer):
                assert torch.equal(a, b), float((a - b).abs().max())
        for a, b in zip(g_again, e_again):
            assert torch.equal(a, b)
        for a, b in zip(g_again, e_got[2][1:]):  # the KV exchanged again: the same sums, at CP > 2 in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nothing_is_graphed_unless_asked_or_where_nothing_captures(rerun_capturer):
    """Default options: no GraphedCall; off CUDA nothing captures; under inference_mode nothing captures."""
    assert TaspOptions().cuda_graphs is False
    assert parse_options({"cuda_graphs": "on"}, use_env=False).cuda_graphs is True
    assert graphed_mod._new_capturer.__name__ == "<lambda>"  # the stand-in
    assert isinstance(graphed_mod._capturer(torch.device("cpu")), Rerun)
    with torch.inference_mode():
        assert graphed_mod._capturer(torch.device("cpu")) is None
    assert graphed_mod.graphed(object()) is None


class FailsOnRank1(Rerun):
    """Stand-in whose backward capture fails on rank 1 only, at its end (as a CUDA capture fails when it
    closes; the stand-in runs the function, so raising before it would leave the peer's exchange unmatched)."""

    def capture(self, fn):
        import torch.distributed as dist

        got = super().capture(fn)
        if COUNTS["captures"] == 2 and dist.get_rank() == 1:
            raise RuntimeError("operation failed due to a previous error during capture")
        return got


def _failing(rank, n):
    import torch.distributed as dist

    clear_plan_cache()
    gen = torch.Generator().manual_seed(3)
    idx = zigzag_index(16, n, rank)
    q, k, v, do = (torch.randn(16, 1, h, 8, generator=gen)[idx].clone() for h in (4, 2, 2, 4))
    res = []
    for opts in (TaspOptions(), TaspOptions(cuda_graphs=True)):
        got = []
        for _ in range(4):
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            out = tasp_attention(qq, kk, vv, dist.group.WORLD, options=opts)
            got.append([out.detach(), *torch.autograd.grad(out, (qq, kk, vv), do)])
        res.append(got)
    call = next(c for c in PLAN_CACHE.scope(dist.group.WORLD).entries.values()
                if getattr(c, "cuda_graphs", False))
    return res, call.graphed.disabled, call.graphed.replay_fwd is None, dict(COUNTS)


def test_a_capture_failing_on_one_rank_leaves_every_rank_eager(monkeypatch):
    """The ranks agree on the capture's outcome: rank 1's failed backward capture disables the graphs on
    both ranks (no rank replays an exchange its peer does not post), and the calls stay exact."""
    COUNTS.update(captures=0, replays=0, warm=0)
    monkeypatch.setattr(graphed_mod, "_new_capturer", lambda device: FailsOnRank1())
    for eager_and_graphed, disabled, no_graph, counts in run_workers(_failing, 2, timeout_s=60):
        eager, graphed = eager_and_graphed
        assert disabled and no_graph and counts["replays"] == 0, counts
        for a, b in zip(graphed, eager):
            for x, y in zip(a, b):
                assert torch.equal(x, y)


def _cpu_asked(rank, n):
    import torch.distributed as dist

    clear_plan_cache()
    q = torch.randn(8, 1, 2, 8, requires_grad=True)
    for _ in range(3):
        out = tasp_attention(q, q, q, dist.group.WORLD, options=TaspOptions(cuda_graphs=True))
        out.sum().backward()
    call = next(c for c in PLAN_CACHE.scope(dist.group.WORLD).entries.values() if hasattr(c, "cuda_graphs"))
    return call.graphed.calls, call.graphed.replay_fwd is None


def test_asked_on_cpu_runs_eagerly():
    for calls, never_captured in run_workers(_cpu_asked, 2, timeout_s=60):
        assert calls == 3 and never_captured
