"""Packed documents at CP=2 on ONE GPU: each rank's compute (no communication) timed alone, against the whole
packed sequence on the same GPU.

Launch two processes on one GPU (``torchrun --nproc-per-node 2 scripts/gpu_thd_rank_probe.py --out x.json``). They
talk over gloo and run TASP with transport ``none`` (the received K/V is a local copy of the sent one: the kernels,
merges and copies of the real schedule, no link). Rank 0 times its packed fwd+bwd while rank 1 waits on the host,
then the other way round, so each rank has the GPU to itself: the larger of the two is the CP=2 per-GPU time with
perfect overlap. Rank 0 then times the whole packed sequence on the same GPU: one varlen FlashAttention-2 call
(the same kernel), TASP at CP=1 and a per-document cuDNN loop. The ratio the packed-documents target is about is
``max_rank_ms / one_gpu_*_ms``; a run on two GPUs adds the communication this one leaves out. ``--profile``
prints each rank's top CUDA kernels at the first size; ``--dense-rows N`` times ``options.packed_dense_rows=N``
beside the default (CP=2 and one GPU); ``--fresh N`` times calls that each get a new document mix (host work and
kernel plans included); ``--host-bounds`` also times the calls with the boundaries given as host integers, as
the Megatron adapter passes them to every layer after the first of a pass (no host sync per call).
``--back-to-back`` times calls queued one after another (steady state, as between a model's layers) instead of
single calls that each start from an idle GPU (which expose the host time of a call's start).
``--paired N`` also times each rank's call against the whole sequence on one GPU in N alternating rounds
(back to back), so both meet the same clocks: the H200 runs power-capped and its clock drifts over seconds,
which moved the separately timed ratio by several percent. ``--profile-trace`` writes the profiles' chrome
traces for ``scripts/trace_summary.py``; ``--memory`` records each rank's peak memory per call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_thd import (  # noqa: E402
    cumsum,
    doc_lengths,
    fresh_mixes,
    fwd_bwd,
    one_gpu_packed,
    one_gpu_varlen,
    parse_tokens,
)

from megatron_tasp import tasp_attention  # noqa: E402
from megatron_tasp.apps.bench.timing import time_back_to_back, time_fn  # noqa: E402
from megatron_tasp.options import default_options  # noqa: E402
from megatron_tasp.thd import partition_index  # noqa: E402


def _in_turn(rank: int, work, width: int, ranks: tuple[int, ...] | None = None) -> list[list[float]]:
    """``work()`` (``width`` numbers) on each of ``ranks`` (None: all) in turn while the others wait on the host,
    so each has the GPU to itself; every rank's numbers (zeros where it did not run)."""
    t = torch.zeros(width, dtype=torch.float64)
    for turn in range(dist.get_world_size()):
        if turn == rank and (ranks is None or rank in ranks):
            t[:] = torch.tensor(work(), dtype=torch.float64)
        dist.barrier()
    every = [torch.zeros(width, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    return [[float(v) for v in x] for x in every]


def _alone(rank: int, step, warmup: int, iters: int, ranks: tuple[int, ...] | None = None,
           back_to_back: bool = False) -> list[float]:
    """``step`` timed on each of ``ranks`` (None: all) in turn while the others wait on the host; every rank's
    time (0 where it did not run): the median of single calls that each start from an idle GPU, or with
    ``back_to_back`` the time per call of calls queued one after another (steady state)."""
    dev = torch.device("cuda", 0)
    timer = time_back_to_back if back_to_back else time_fn
    return [x[0] for x in _in_turn(rank, lambda: [timer(step, dev, warmup, iters)], 1, ranks)]


def _paired(rank: int, step, one, warmup: int, iters: int, rounds: int) -> list[list[float]]:
    """On each rank in turn (the others wait on the host): ``rounds`` rounds of ``iters`` calls of ``step``
    then ``iters`` of ``one`` (the whole sequence on this GPU), each queued back to back, so both meet the
    same clocks (the H200 runs power-capped, and its clock drifts over seconds). Every rank's
    ``[step ms, one ms, ratio]`` per round, medians over the rounds."""
    dev = torch.device("cuda", 0)

    def work() -> list[float]:
        for fn in (step, one):
            for _ in range(warmup):
                fn()
        rows = []
        for _ in range(rounds):
            a = time_back_to_back(step, dev, 0, iters, rounds=1)
            b = time_back_to_back(one, dev, 0, iters, rounds=1)
            rows.append((a, b, a / b))
        return [statistics.median(x) for x in zip(*rows)]

    return _in_turn(rank, work, 3)


def _host_ms(rank: int, step, iters: int) -> list[float]:
    """On each rank in turn (the others wait on the host): milliseconds of host time per call of ``step`` while
    ``iters`` calls are queued back to back (perf_counter up to the last call's return, before the closing
    synchronisation). Near the back-to-back GPU time per call, the calls are host-bound."""
    import time

    def work() -> list[float]:
        step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        ms = (time.perf_counter() - t0) * 1e3 / iters
        torch.cuda.synchronize()
        return [ms]

    return [x[0] for x in _in_turn(rank, work, 1)]


def _peak_mib(rank: int, step) -> list[list[float]]:
    """On each rank in turn (the others wait on the host): MiB allocated above what was live before one call of
    ``step`` (peak of the caching allocator's allocations, every stream of this process), and what the
    allocator reserved at that point; ``[peak, reserved]`` per rank."""

    def work() -> list[float]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return [(torch.cuda.max_memory_allocated() - before) / 2**20, torch.cuda.memory_reserved() / 2**20]

    return _in_turn(rank, work, 2)


def _profile(rank: int, step, label: str, ranks: tuple[int, ...] | None = None, trace: str | None = None,
             steps: int = 5, cpu: bool = False) -> None:
    """Profile ``steps`` calls of ``step`` queued back to back on each of ``ranks`` in turn: print the top CUDA
    kernels and write a chrome trace to ``trace`` (``{rank}`` in it is replaced) for scripts/trace_summary.py,
    which also tells how much of the span some kernel ran."""
    from torch.profiler import ProfilerActivity, profile

    for turn in range(dist.get_world_size()):
        if turn == rank and (ranks is None or rank in ranks):
            step()
            torch.cuda.synchronize()
            acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
            with profile(activities=acts) as p:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
            print(f"== {label}, rank {rank}, {steps} calls back to back", flush=True)
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60),
                  flush=True)
            if trace:
                p.export_chrome_trace(trace.format(rank=rank))
        dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="32k,64k,128k", help="packed tokens per sequence (comma list; 'k' = 1024)")
    ap.add_argument("--doc-mean", type=int, default=4096, help="mean document length of the log-normal mix")
    ap.add_argument("--heads", default="32/8", help="query/KV heads")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-trace", default=None, help="with --profile: write each profile's chrome trace here "
                    "('{rank}' and '{what}' are replaced)")
    ap.add_argument("--profile-cpu", action="store_true", help="with --profile: record host operators too (the "
                    "trace shows where the host spends each call; recording adds host time)")
    ap.add_argument("--host-time", action="store_true", help="also record each rank's host time per call queued "
                    "back to back (host-bound calls show it near their GPU time)")
    ap.add_argument("--profile", action="store_true", help="print each rank's top CUDA kernels at the first size, "
                    "and those of TASP on one GPU")
    ap.add_argument("--dense-rows", type=int, default=0, help="also time options.packed_dense_rows=N (square causal "
                    "documents of >= N rows on the dense kernel, bucket-padded), at CP=2 and on one GPU")
    ap.add_argument("--fresh", type=int, default=0, help="also time N calls per size that each get a NEW document "
                    "mix (host included), both ranks at once, every variant interleaved")
    ap.add_argument("--packed-kernels", default="", help="also time these values of options.packed_kernel "
                    "(comma list of auto, cudnn, flash), at CP=2 and on one GPU")
    ap.add_argument("--host-bounds", action="store_true", help="also time the default options with the "
                    "boundaries as host integers (no host sync per call, as Megatron's later layers), at CP=2 and "
                    "on one GPU")
    ap.add_argument("--no-pad", action="store_true", help="documents of the mix's padded lengths (multiples of "
                    "2*CP): no padding tokens")
    ap.add_argument("--paired", type=int, default=0, help="also time each rank's call and the whole sequence on "
                    "one GPU in N alternating rounds of --iters calls back to back (same clocks for both): "
                    "per-rank medians of the times and of their ratio")
    ap.add_argument("--back-to-back", action="store_true", help="time calls queued back to back (steady state, "
                    "as between a model's layers: host work overlaps the previous call's GPU work) instead of "
                    "single calls that each start from an idle GPU")
    ap.add_argument("--memory", action="store_true", help="also record each rank's peak memory of one fwd+bwd "
                    "(MiB above what was allocated before the call) and what the allocator then reserved")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    # a rank that fails while the other waits in a barrier ends the run within minutes, not the default half hour
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    n, r = dist.get_world_size(), dist.get_rank()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    hq, hkv = (int(x) for x in a.heads.split("/"))
    d, dtype = 128, torch.bfloat16
    res = {"cp": n, "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "dtype": str(dtype),
           "heads": a.heads, "head_dim": d, "doc_mean": a.doc_mean, "transport": "none (each rank alone)",
           "timing": "back to back (steady state)" if a.back_to_back else "single calls from an idle GPU", "rows": []}
    variants = [("default", default_options(), False)]  # (name, options, boundaries as host integers)
    if a.host_bounds:
        variants.append(("host_bounds", default_options(), True))
    if a.dense_rows:
        variants.append((f"dense_rows_{a.dense_rows}", default_options().replace(packed_dense_rows=a.dense_rows),
                         False))
    for name in filter(None, a.packed_kernels.split(",")):
        variants.append((f"packed_kernel_{name}", default_options().replace(packed_kernel=name), False))
    for i, tok in enumerate(parse_tokens(a.tokens)):
        lens, padded = doc_lengths(tok, a.doc_mean, n, seed=tok)
        if a.no_pad:
            lens = list(padded)
        g = torch.Generator(device=dev).manual_seed(5)
        q, k, v, do = (torch.randn(tok, h, d, device=dev, dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq))
        cu_pad, cu = cumsum(padded, dev), cumsum(lens, dev)
        idx = partition_index(cu_pad, n, r).to(dev)
        ql, kl, vl = (x[idx].detach().requires_grad_(True) for x in (q, k, v))
        qf, kf, vf = (x.detach().requires_grad_(True) for x in (q, k, v))
        row = {"tokens": tok, "docs": len(lens), "doc_lengths": lens}
        host = (tuple(cu_pad.tolist()), tuple(cu.tolist()))
        for vname, opts, on_host in variants:
            bounds = host if on_host else (cu_pad, cu)

            def tasp(x, y, z, cp=bounds[0], c=bounds[1], o=opts):
                return tasp_attention(x, y, z, dist.group.WORLD, causal=True, cu_seqlens_padded=cp, cu_seqlens=c,
                                      transport="none", options=o)

            step = fwd_bwd(tasp, ql, kl, vl, do[idx])
            step()  # both ranks together: the layout is built and agreed once
            dist.barrier()
            suffix = "" if vname == "default" else "_" + vname
            row["rank_ms" + suffix] = _alone(r, step, a.warmup, a.iters, back_to_back=a.back_to_back)
            row["max_rank_ms" + suffix] = max(row["rank_ms" + suffix])
            if a.host_time:
                row["host_ms" + suffix] = _host_ms(r, step, a.iters)
            if a.memory:
                row["peak_reserved_mib" + suffix] = _peak_mib(r, step)
            if a.profile and i == 0:
                _profile(r, step, f"CP=2 packed, {tok} tokens, {vname}", cpu=a.profile_cpu,
                         trace=a.profile_trace and a.profile_trace.replace("{what}", f"cp2_{vname}"))
            one = fwd_bwd(lambda x, y, z, cp=bounds[0], c=bounds[1], o=opts: tasp_attention(
                x, y, z, None, causal=True, cu_seqlens_padded=cp, cu_seqlens=c, options=o), qf, kf, vf, do)
            row["one_gpu_tasp_ms" + suffix] = _alone(r, one, a.warmup, a.iters, ranks=(0,),
                                                    back_to_back=a.back_to_back)[0]
            if a.host_time:
                row["one_gpu_host_ms" + suffix] = _host_ms(r, one, a.iters)[0]
            if a.memory:
                row["one_gpu_peak_reserved_mib" + suffix] = _peak_mib(r, one)[0]
            if a.paired:
                paired = _paired(r, step, one, a.warmup, a.iters, a.paired)
                row["paired" + suffix] = {"rank_ms": [x[0] for x in paired], "one_gpu_ms": [x[1] for x in paired],
                                          "ratio": [x[2] for x in paired], "max_ratio": max(x[2] for x in paired)}
            if a.profile and i == 0:
                _profile(r, one, f"one GPU TASP, {tok} tokens, {vname}", ranks=(0,), cpu=a.profile_cpu,
                         trace=a.profile_trace and a.profile_trace.replace("{what}", f"one_{vname}"))
            row["max_rank_over_one_gpu_tasp" + suffix] = row["max_rank_ms" + suffix] / row["one_gpu_tasp_ms" + suffix]
        m = (lens, padded, True)
        for name, fn in (("one_gpu_varlen_ms", lambda x, y, z, m=m: one_gpu_varlen(x, y, z, *m)),
                         ("one_gpu_packed_ms", lambda x, y, z, m=m: one_gpu_packed(x, y, z, *m))):
            row[name] = _alone(r, fwd_bwd(fn, qf, kf, vf, do), a.warmup, a.iters, ranks=(0,),
                              back_to_back=a.back_to_back)[0]
        best = min(val for key, val in row.items() if key.startswith("one_gpu_") and key.endswith("_ms")
                   or key.startswith("one_gpu_tasp_ms"))
        for vname, *_ in variants:
            suffix = "" if vname == "default" else "_" + vname
            row["max_rank_over_best_one_gpu" + suffix] = row["max_rank_ms" + suffix] / best
        if a.fresh:
            # both ranks at once on the one GPU: about twice a rank's GPU work per call
            row["fresh_mixes"] = fresh_mixes(a, tok, n, r, q, k, v, do, tok, dev, True,
                                             variants=[(nm, o) for nm, o, on_host in variants if not on_host],
                                             transport="none")
        res["rows"].append(row)
        if r == 0:
            print(json.dumps({key: val for key, val in row.items() if key != "doc_lengths"}), flush=True)
        del q, k, v, do, ql, kl, vl, qf, kf, vf
        torch.cuda.empty_cache()
    if r == 0 and a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
