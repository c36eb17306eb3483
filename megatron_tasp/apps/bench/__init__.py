"""``megatron-tasp bench``: time TASP against ring, compute-only, single-GPU and PyTorch CP.

Launch one process per GPU (``torchrun --nproc-per-node N -m megatron_tasp.cli bench ...``). On CPU,
``--device cpu --world-size N`` forks gloo ranks itself (a smoke test of the harness, not a benchmark).

Each configuration is verified before it is timed: TASP's output shard is compared with single-device
attention over the whole sequence. Times are CUDA-event medians of ``--iters`` repetitions after
``--warmup``, max over ranks. TFLOP/s counts the true mask area: forward 4*b*h*S^2*d (half of it when
causal), forward+backward 3.5x forward, divided by the CP size for per-GPU rates (``attention_flops``).

Implementations: ``tasp``; ``compute_only`` (TASP with a local copy instead of each exchange: the bound of
the engine without communication); ``kernel_bound`` (the same block kernels alone, see ``kernel_bound``);
``single_gpu`` (the whole sequence on one device); ``torch_cp_allgather`` / ``torch_cp_alltoall`` (PyTorch's
native context parallel). Records: ``megatron_tasp.costmodel.records.BenchRecord``. The TASP flags are
validated by ``megatron_tasp.options`` (the same rules as every other entry point; MEGATRON_TASP_*
variables fill what the flags leave unset).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from megatron_tasp.apps.bench.impls import bench_shape
from megatron_tasp.apps.bench.timing import environment, time_fn, time_round_robin
from megatron_tasp.apps.bench.torch_cp import bench_torch_cp, transport_sweep
from megatron_tasp.costmodel.records import BenchRecord, write_records
from megatron_tasp.options import parse_keep_kv, parse_options

__all__ = ["IMPLS", "cmd_bench", "register", "run_bench", "tasp_flags", "time_fn", "time_round_robin"]

IMPLS = ("tasp", "compute_only", "kernel_bound", "single_gpu", "torch_cp_allgather", "torch_cp_alltoall")


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_tokens(text: str) -> list[int]:
    return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in _split(text)]


def _parse_heads(text: str) -> list[tuple[int, int]]:
    out = []
    for x in _split(text):
        q, _, kv = x.partition("/")
        out.append((int(q), int(kv or q)))
    return out


def tasp_flags(args: argparse.Namespace) -> None:
    """Validate the TASP flags through ``megatron_tasp.options`` (one value at a time, so an error names it)
    and store ``args.options`` (the base TaspOptions) and the lists of values to sweep."""
    where = "megatron-tasp bench flags"
    args.options = parse_options({"kernel": args.kernel}, where=where)
    one = lambda **kw: parse_options(kw, use_env=False, where=where)  # noqa: E731
    args.num_rings = [one(num_rings=x).num_rings for x in _split(args.num_rings)] or None
    args.transports = [one(transport=x).transport for x in _split(args.transports)]
    args.chunks = [one(chunks=x).chunks for x in _split(args.chunks)]
    args.keep_kv = [parse_keep_kv(x) for x in _split(args.keep_kv)]
    if not (args.transports and args.chunks and args.keep_kv):
        raise ValueError("--transports, --chunks and --keep-kv each need at least one value")


def run_bench(cfg: argparse.Namespace, rank: int, world: int) -> list[BenchRecord]:
    """Run every requested shape (and the transport sweep) on this rank; return the records."""
    import torch
    import torch.distributed as dist

    device = torch.device(cfg.device if cfg.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    cfg.group = dist.group.WORLD
    env = environment(device)
    mesh = None
    if device.type == "cuda" and any(i.startswith("torch_cp") for i in cfg.impls):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (world,))
    shapes = [{"tokens": t, "hq": hq, "hkv": hkv, "causal": c}
              for t in cfg.tokens for hq, hkv in cfg.heads for c in cfg.causal]
    records: list[BenchRecord] = []
    bar = _progress(len(shapes) * (2 if mesh is not None else 1), rank)
    for shape in shapes:
        records.extend(bench_shape(cfg, rank, world, device, env, shape))
        bar.update(1)
        if rank == 0 and cfg.out:  # keep what is measured even if the run is cut short
            write_records(cfg.out, records)
    if mesh is not None:  # PyTorch CP patches SDPA dispatch: run it after all of our own measurements
        for shape in shapes:
            records.extend(bench_torch_cp(cfg, world, device, env, shape, mesh))
            bar.update(1)
            if rank == 0 and cfg.out:
                write_records(cfg.out, records)
        torch.cuda.empty_cache()
    bar.close()
    if cfg.transport_sweep:
        records.extend(transport_sweep(cfg, rank, world, device, env))
    return records


class _NoBar:
    def update(self, _n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, rank: int) -> Any:
    if rank != 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="shapes", unit="shape")


def _cpu_worker(rank: int, world: int, cfg: argparse.Namespace) -> list[BenchRecord]:
    return run_bench(cfg, rank, world)


def _line(r: BenchRecord) -> str:
    """One line of the summary printed after a run."""
    if r.error is not None:
        return f"ERROR {r.impl} tokens={r.tokens_per_gpu}: {r.error[:200]}"
    if r.kind == "transport":
        return f"{r.impl:<22} {r.bytes / 2**20:8.2f} MiB  {r.GBps_per_direction:8.1f} GB/s"
    if r.time_ms is None:
        return f"{r.impl:<20} tok={r.tokens_per_gpu:>6} {r.passes:<7} extra memory {r.extra_mem_mb or 0:.0f} MiB"
    err = f" err={r.max_rel_err:.1e}" if r.max_rel_err is not None else ""
    kept = {True: "kept", False: "sent"}.get(r.keep_kv, "-")
    return (f"{r.impl:<20} k={r.num_rings} {r.transport or '':<5} c={r.chunks} kv={kept:<4} tok={r.tokens_per_gpu:>6} "
            f"h={r.heads_q}/{r.heads_kv} causal={int(r.causal)} {r.passes:<7} {r.time_ms:9.3f} ms "
            f"{r.tflops_per_gpu:7.1f} TFLOP/s{err}")


def cmd_bench(args: argparse.Namespace) -> int:
    """Entry of ``megatron-tasp bench``."""
    args.tokens = _parse_tokens(args.tokens)
    args.heads = _parse_heads(args.heads)
    args.causal = {"both": [True, False], "causal": [True], "none": [False]}[args.mask]
    args.passes = _split(args.passes)
    args.impls = _split(args.impls)
    bad = [i for i in args.impls if i not in IMPLS] + [p for p in args.passes if p not in ("fwd", "fwd_bwd")]
    if bad:
        raise ValueError(f"unknown --impls/--passes {bad}; choose from {', '.join(IMPLS)} and fwd, fwd_bwd")
    tasp_flags(args)
    args.msg_sizes = [int(float(x) * 2**20) for x in _split(args.msg_sizes_mb)]
    if args.device == "cpu":
        from megatron_tasp.launch import run_workers

        args.group = None
        records = run_workers(_cpu_worker, args.world_size, args, timeout_s=1800)[0]
    else:
        import torch
        import torch.distributed as dist

        if "RANK" not in os.environ:
            raise ValueError("launch GPU benchmarks with torchrun, e.g. "
                             "torchrun --nproc-per-node 2 -m megatron_tasp.cli bench ...")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        records = run_bench(args, dist.get_rank(), dist.get_world_size())
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    if args.out:
        write_records(args.out, records)
        print(f"wrote {len(records)} records to {args.out}")
    for r in records:
        print(_line(r))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command."""
    p = sub.add_parser("bench", help="benchmark TASP vs ring, compute-only, single GPU and PyTorch CP",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1k,2k,4k,8k,16k,32k,64k", help="tokens per GPU (comma list; 'k' = 1024)")
    p.add_argument("--heads", default="32/32,32/8", help="query/KV heads (comma list)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mask", choices=("both", "causal", "none"), default="both")
    p.add_argument("--passes", default="fwd,fwd_bwd", help="fwd and/or fwd_bwd")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--num-rings", default="",
                   help="ring counts for TASP (comma list; 'auto'; default: 1 and the maximum)")
    p.add_argument("--transports", default="a2a,p2p", help="TASP transports to time (a2a, p2p, symm, auto)")
    p.add_argument("--chunks", default="1", help="TASP messages per piece and step to time (comma list; 'auto')")
    p.add_argument("--keep-kv", default="auto",
                   help="TASP keep_kv settings to time (comma list of auto, 1, 0): keep the forward's KV for the "
                        "backward or exchange it again")
    p.add_argument("--kernel", default=None, help="block kernel (default: auto)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--min-total-ms", type=float, default=0.0,
                   help="grow the repetitions of fast shapes until they cover this much time (max 20x --iters)")
    p.add_argument("--rounds", type=int, default=4,
                   help="TASP and compute-only variants of a shape are timed in this many interleaved rounds "
                        "(each variant's repetitions split over them), so machine drift hits all alike")
    p.add_argument("--transport-sweep", action="store_true", help="also run the transport microbenchmark")
    p.add_argument("--msg-sizes-mb", default="0.25,1,2,4,8,16,32,64,128,256")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--world-size", type=int, default=2, help="ranks to fork with --device cpu")
    p.add_argument("--out", help="write the records as JSON here")
    p.set_defaults(func=cmd_bench)
