"""TASP forward+backward captured in one CUDA graph (torchrun, 2+ GPUs): correctness and timing.

Small shapes are bound by the host: Python, kernel launches and the exchange's launch path. A CUDA
graph replays the whole call without any of that. This script captures ``tasp_attention`` forward +
``torch.autograd.grad`` for each transport (``none`` = the compute-only bound), checks that replaying
the graph gives the eager results, and times eager vs replay (CUDA events, median, max over ranks).
``kernel_bound`` in ``--transports`` also captures the bench's plain-kernel bound (the same block work on
contiguous tensors: no engine, no merge, no communication), so graphed TASP is compared with a graphed bound.

    torchrun --nproc-per-node 2 scripts/gpu_graph_check.py --out graph.json

``--internal`` checks TASP's own graphs instead (``TaspOptions(cuda_graphs=True)``, plain eager calls from the
caller's side): three "layers" of one signature (forward all, then backward all) against eager TASP, no host
synchronisation in a replayed call, and eager TASP / graphed-internally TASP / the plain kernels (eager), timed
round-robin in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.distributed as dist

from megatron_tasp import tasp_attention
from megatron_tasp.apps.bench import time_fn
from megatron_tasp.apps.bench.kernel_bound import block_work, kernel_bound_fn
from megatron_tasp.apps.bench.timing import max_over_ranks, time_round_robin
from megatron_tasp.engine.cache import PLAN_CACHE
from megatron_tasp.kernels import get_kernel
from megatron_tasp.options import TaspOptions


def capture(step) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``step`` up on a side stream, then capture one call of it there; returns (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread queries events while we capture; that must not void the capture.
    # Capture on the warm-up stream: with NCCL >= 2.28 a new stream can mean new NCCL buffer registrations
    # inside the capture.
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        static = step()
    return graph, static


def one_case(tokens: int, hkv: int, causal: bool, transport: str, g, dev, iters: int) -> dict:
    gen = torch.Generator(device=dev).manual_seed(tokens + hkv)
    q = torch.randn(tokens, 1, 32, 128, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(tokens, 1, hkv, 128, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(tokens, 1, hkv, 128, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    do = torch.randn(tokens, 1, 32, 128, device=dev, dtype=torch.bfloat16, generator=gen)

    def step():
        out = tasp_attention(q, k, v, g, causal=causal, transport=transport)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    eager = [t.clone() for t in step()]
    again = step()  # control: two eager runs (the fused kernels' backward need not be bitwise repeatable)
    eager_repeat = max(float((a.float() - b.float()).abs().max()) for a, b in zip(again, eager))
    graph, static = capture(step)
    graph.replay()
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(static, eager))
    maxdiff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(static, eager))
    t_eager = time_fn(step, dev, 0, iters)
    t_graph = time_fn(graph.replay, dev, 0, iters)
    t = torch.tensor([t_eager, t_graph, float(not same)], device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    del graph
    return {"tokens_per_gpu": tokens, "heads_q": 32, "heads_kv": hkv, "causal": causal, "transport": transport,
            "eager_ms": float(t[0]), "graph_ms": float(t[1]), "replay_equals_eager": bool(t[2] == 0),
            "max_abs_diff": maxdiff, "eager_vs_eager_max_abs_diff": eager_repeat}


def kernel_bound_case(tokens: int, hkv: int, g, dev, iters: int) -> dict:
    """Eager and graphed time of ``kernel_bound`` (causal fwd+bwd), max over ranks."""
    rank, n = dist.get_rank(g), dist.get_world_size(g)
    gen = torch.Generator(device=dev).manual_seed(tokens + hkv)
    q, do = (torch.randn(1, 32, tokens, 128, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, hkv, tokens, 128, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    kernel = get_kernel("auto", dev, torch.bfloat16, 128)
    step = kernel_bound_fn(kernel, q, k, v, do, block_work(tokens, n, rank, True), "fwd_bwd", 128 ** -0.5)
    graph, _ = capture(step)
    t = torch.tensor([time_fn(step, dev, 0, iters), time_fn(graph.replay, dev, 0, iters)], device=dev,
                     dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    del graph
    return {"tokens_per_gpu": tokens, "heads_q": 32, "heads_kv": hkv, "causal": True, "transport": "kernel_bound",
            "kernel": kernel.name, "eager_ms": float(t[0]), "graph_ms": float(t[1])}


def internal_case(tokens: int, hkv: int, g, dev, iters: int, transport: str | None = None) -> dict:
    """TASP with options.cuda_graphs against eager TASP: three layers' results, sync check, timings."""
    rank, n = dist.get_rank(g), dist.get_world_size(g)
    gen = torch.Generator(device=dev).manual_seed(tokens + hkv)
    layers = [[torch.randn(tokens, 1, h, 128, device=dev, dtype=torch.bfloat16, generator=gen)
               for h in (32, hkv, hkv, 32)] for _ in range(3)]
    eager_opts = TaspOptions()
    graphs = eager_opts.replace(cuda_graphs=True)
    kw = {} if transport is None else {"transport": transport}

    def run(opts):
        ins = [[x.clone().requires_grad_(i < 3) for i, x in enumerate(layer)] for layer in layers]
        outs = [tasp_attention(q, k, v, g, options=opts, **kw) for q, k, v, _ in ins]
        torch.autograd.backward(outs, [layer[3] for layer in ins])
        return [[o.detach()] + [x.grad for x in layer[:3]] for o, layer in zip(outs, ins)]

    eager, eager2 = run(eager_opts), run(eager_opts)
    run(graphs)  # first call of the signature eager, the second captures, the third replays
    replayed = run(graphs)  # every layer replayed
    runners = [c.graphed for c in PLAN_CACHE.scope(g).entries.values() if getattr(c, "graphed", None) is not None]
    captured = bool(runners) and all(r.replay_fwd is not None and not r.disabled for r in runners)
    diff = max(float((a.float() - b.float()).abs().max()) for la, lb in zip(replayed, eager) for a, b in zip(la, lb))
    control = max(float((a.float() - b.float()).abs().max()) for la, lb in zip(eager2, eager) for a, b in zip(la, lb))
    same = all(torch.equal(a, b) for la, lb in zip(replayed, eager) for a, b in zip(la, lb))
    q, k, v, do = (x.clone().requires_grad_(i < 3) for i, x in enumerate(layers[0]))

    def step(opts):
        return torch.autograd.grad(tasp_attention(q, k, v, g, options=opts, **kw), (q, k, v), do)

    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        step(graphs)
        sync = "none"
    except RuntimeError as exc:
        sync = str(exc)[:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    kernel = get_kernel("auto", dev, torch.bfloat16, 128)
    bhsd = [x.detach().permute(1, 2, 0, 3) for x in (q, k, v, do)]
    bound = kernel_bound_fn(kernel, *bhsd, block_work(tokens, n, rank, True), "fwd_bwd", 128 ** -0.5)
    fns = [lambda: step(eager_opts), lambda: step(graphs), bound]
    for fn in fns:
        fn()
    ms = time_round_robin(fns, dev, iters, rounds=4,
                          reduce=lambda x: max_over_ranks(x, dev, g))
    # every rank's verdict: the worst of each
    diff, control = max_over_ranks(diff, dev, g), max_over_ranks(control, dev, g)
    same = max_over_ranks(float(not same), dev, g) == 0
    captured = max_over_ranks(float(not captured), dev, g) == 0
    synced = max_over_ranks(float(sync != "none"), dev, g) > 0
    return {"tokens_per_gpu": tokens, "heads_q": 32, "heads_kv": hkv, "causal": True, "mode": "internal",
            "transport": transport or "default",
            "eager_ms": ms[0], "graphed_ms": ms[1], "kernel_bound_ms": ms[2],
            "eager_over_bound": ms[0] / ms[2], "graphed_over_bound": ms[1] / ms[2],
            "captured_on_every_rank": captured, "replay_equals_eager": same, "max_abs_diff": diff,
            "eager_vs_eager_max_abs_diff": control, "host_sync": sync, "host_sync_on_some_rank": synced}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,2048,4096,8192")
    ap.add_argument("--transports", default="a2a,symm,none")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--internal", action="store_true", help="check TASP's own graphs (options.cuda_graphs)")
    ap.add_argument("--gloo-one-gpu", action="store_true", help="with --internal: every rank on GPU 0 over a gloo "
                    "group and transport 'none' (no communication): the capture without NCCL, on one GPU")
    ap.add_argument("--out", default="graph.json")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    if args.gloo_one_gpu:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("nccl", device_id=dev)  # eager communicator: nothing is created during a capture
    g = dist.group.WORLD
    rows = []
    for tokens in (int(x) for x in args.tokens.split(",")):
        for hkv in (32, 8):
            for tr in (["internal"] if args.internal else args.transports.split(",")):
                try:
                    if tr == "internal":
                        row = internal_case(tokens, hkv, g, dev, args.iters, "none" if args.gloo_one_gpu else None)
                    elif tr == "kernel_bound":
                        row = kernel_bound_case(tokens, hkv, g, dev, args.iters)
                    else:
                        row = one_case(tokens, hkv, True, tr, g, dev, args.iters)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    row = {"tokens_per_gpu": tokens, "heads_kv": hkv, "transport": tr,
                           "error": "".join(traceback.format_exception_only(exc))[-800:]}
                rows.append(row)
                if dist.get_rank() == 0:
                    print(json.dumps(row), flush=True)
    if dist.get_rank() == 0:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "cp": dist.get_world_size()}
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
