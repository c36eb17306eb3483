"""Profile one TASP forward+backward on GPUs (torchrun) beside the plain kernels of the same block work.

    torchrun --nproc-per-node 2 scripts/gpu_profile_attention.py --tokens 4096,16384 --out-dir DIR

Per token count, rank 0 writes ``profile_<tokens>.txt`` (host-sync check, host enqueue time, the torch
profiler's tables) and adds to ``profile.json``: per-kernel CUDA time of TASP and of ``kernel_bound`` (the
bench impl: the same blocks as plain contiguous-bhsd kernel calls), and how busy the GPU was between the
first and the last kernel of a call (1.0 = no idle gaps).
TASP and ``kernel_bound`` are timed round-robin twice, TASP first and then the bound first (the mean of the two
medians, and the medians by position, which expose an order effect such as clock drift).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from collections import defaultdict

import torch
import torch.distributed as dist

from megatron_tasp import tasp_attention
from megatron_tasp.apps.bench.kernel_bound import block_work, kernel_bound_fn
from megatron_tasp.apps.bench.timing import busy_time, time_round_robin
from megatron_tasp.kernels import get_kernel
from megatron_tasp.options import parse_keep_kv


def _device_events(prof) -> list:
    """The GPU operations of a profile (user annotations such as ``nccl:all_to_all`` left out: they mirror a
    kernel that is counted already)."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False) and not e.name.startswith("nccl:")]


def _kernel_table(prof, calls: int) -> dict[str, list[float]]:
    """{kernel name: [launches per call, us per call]} sorted by time, names shortened."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in _device_events(prof):
        name = e.name[:90]
        acc[name][0] += 1 / calls
        acc[name][1] += (e.time_range.end - e.time_range.start) / calls
    return {k: [round(c, 2), round(t, 1)] for k, (c, t) in sorted(acc.items(), key=lambda kv: -kv[1][1])}


def _busy(prof) -> float:
    """Fraction of the span from the first to the last kernel in which some kernel ran (any stream)."""
    iv = [(e.time_range.start, e.time_range.end) for e in _device_events(prof)]
    if not iv:
        return 0.0
    return busy_time(iv) / max(max(e for _, e in iv) - min(s for s, _ in iv), 1e-9)


def _profile(fn, calls: int):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def _timed_both_orders(step, bound, device, iters: int = 24, rounds: int = 6) -> dict:
    """TASP (``step``) and ``kernel_bound`` timed by the bench's round-robin timer (warmed up here), once with
    TASP first in every round and once with the bound first: each time the mean of the two medians, and the
    medians by position, which show an order effect (clock drift) if there is one."""
    for fn in (step, bound):
        for _ in range(3):
            fn()
    tasp_first = time_round_robin([step, bound], device, iters, rounds)
    bound_first = time_round_robin([bound, step], device, iters, rounds)
    return {"tasp": (tasp_first[0] + bound_first[1]) / 2, "kernel_bound": (tasp_first[1] + bound_first[0]) / 2,
            "by_position": {"tasp_first": round(tasp_first[0], 3), "kernel_bound_second": round(tasp_first[1], 3),
                            "kernel_bound_first": round(bound_first[0], 3), "tasp_second": round(bound_first[1], 3)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,8192")
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--transport", default=None, help="TASP transport (default: the options'); 'none' profiles "
                    "compute_only, the engine without communication")
    ap.add_argument("--keep-kv", default=None, choices=("auto", "on", "off"), help="keep_kv (default: the options')")
    ap.add_argument("--out-dir", default=".")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    hq, hkv = (int(x) for x in args.heads.split("/"))
    g = dist.group.WORLD
    summary = {}
    kw = {"transport": args.transport, "keep_kv": None if args.keep_kv is None else parse_keep_kv(args.keep_kv)}
    for tokens in (int(t) for t in args.tokens.split(",")):
        q = torch.randn(tokens, 1, hq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(tokens, 1, hkv, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(tokens, 1, hkv, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)

        def step(q=q, k=k, v=v, do=do):
            torch.autograd.grad(tasp_attention(q, k, v, g, **kw), (q, k, v), do)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            step()
            sync = "none"
        except RuntimeError:
            sync = traceback.format_exc()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            tasp_attention(q, k, v, g, **kw)
        cpu_fwd = (time.perf_counter() - t0) / 10 * 1e3  # host time to enqueue one forward
        kernel = get_kernel("auto", q.device, q.dtype, 128)
        bhsd = [x.detach().permute(1, 2, 0, 3) for x in (q, k, v, do)]
        bound = kernel_bound_fn(kernel, *bhsd, block_work(tokens, world, rank, True), "fwd_bwd", 128 ** -0.5)
        ms = _timed_both_orders(step, bound, q.device)
        prof = _profile(step, args.calls)
        prof_b = _profile(bound, args.calls)
        if rank == 0:
            summary[tokens] = {"ms": ms, "host_enqueue_fwd_ms": round(cpu_fwd, 3), "host_sync": sync[:300],
                               "gpu_busy": {"tasp": round(_busy(prof), 3), "kernel_bound": round(_busy(prof_b), 3)},
                               "kernels_tasp": _kernel_table(prof, args.calls),
                               "kernels_bound": _kernel_table(prof_b, args.calls)}
            with open(os.path.join(args.out_dir, f"profile_{tokens}.txt"), "w") as f:
                f.write(f"tokens/GPU {tokens}, heads {hq}/{hkv}; host enqueue time per forward {cpu_fwd:.3f} ms\n")
                f.write(f"host sync check: {sync}\n\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
                f.write("\n\n")
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
            print(f"tokens {tokens}: tasp {ms['tasp']:.3f} ms, bound {ms['kernel_bound']:.3f} ms, "
                  f"busy {summary[tokens]['gpu_busy']}, host enqueue per forward {cpu_fwd:.3f} ms; "
                  f"sync: {sync[:200]}", flush=True)
    if rank == 0:
        with open(os.path.join(args.out_dir, "profile.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": args.heads,
                   "transport": args.transport, "keep_kv": args.keep_kv,
                       "shapes": summary}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
