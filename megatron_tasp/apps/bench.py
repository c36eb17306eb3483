"""``megatron-tasp bench``: time TASP against ring, compute-only, single-GPU and PyTorch CP.

Launch one process per GPU (``torchrun --nproc-per-node N -m megatron_tasp.cli bench ...``). On CPU,
``--device cpu --world-size N`` forks gloo ranks itself (a smoke test of the harness, not a benchmark).

Each configuration is verified before it is timed: TASP's output shard is compared with single-device
attention over the whole sequence. Times are CUDA-event medians of ``--iters`` repetitions after
``--warmup``, max over ranks. TFLOP/s counts the true mask area: forward 4*b*h*S^2*d (half of it when
causal), forward+backward 3.5x forward, divided by the CP size for per-GPU rates.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Which backward the records ran: remote dKV accumulators start at step 1 and hop home in the input dtype.
DKV_SCHEME = "remote-acc-home-input-dtype"
IMPLS = ("tasp", "compute_only", "single_gpu", "torch_cp_allgather", "torch_cp_alltoall")


def attention_flops(seq: int, batch: int, heads: int, head_dim: int, causal: bool, passes: str) -> float:
    """FLOPs of attention over the whole sequence (true mask area)."""
    f = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return f * (3.5 if passes == "fwd_bwd" else 1.0)


def _parse_list(text: str, typ: Callable[[str], Any]) -> list[Any]:
    return [typ(x) for x in text.split(",") if x.strip()]


def _parse_tokens(text: str) -> list[int]:
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
    return out


def _parse_heads(text: str) -> list[tuple[int, int]]:
    out = []
    for x in text.split(","):
        q, _, kv = x.partition("/")
        out.append((int(q), int(kv or q)))
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device, warmup: int, iters: int, min_total_ms: float = 0.0,
            agree: Callable[[float], float] | None = None) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU) after ``warmup`` calls.

    With ``min_total_ms`` the repetitions grow (up to 20x ``iters``) until they cover that much time, so
    sub-millisecond shapes get enough samples; ``agree`` (e.g. max over ranks) makes every rank run the
    same count, which collectives inside ``fn`` require.
    """
    for _ in range(warmup):
        fn()
    return time_round_robin([fn], device, iters, 1, min_total_ms, agree=agree)[0]


def time_round_robin(fns: list[Callable[[], Any]], device, iters: int, rounds: int = 1, min_total_ms: float = 0.0,
                     agree: Callable[[float], float] | None = None,
                     reduce: Callable[[float], float] | None = None) -> list[float]:
    """Median milliseconds of each of ``fns`` (warmed up by the caller), timed in ``rounds`` rounds that take
    turns (round 1 of every fn, then round 2, ...), so that slow drifts of the machine (clocks, other
    tenants of the host) fall on every variant alike instead of on whichever ran during them. Each sample
    is one call between CUDA events with a synchronisation after it (perf_counter on CPU), ``reduce``d
    (e.g. max over ranks) per sample. ``min_total_ms`` grows the repetitions as in :func:`time_fn`."""
    import torch

    counts = []
    for fn in fns:
        n_it = iters
        if min_total_ms > 0:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            one = max((time.perf_counter() - t0) * 1e3, 1e-3)
            want = float(min(20 * iters, max(iters, math.ceil(min_total_ms / one))))
            n_it = int(agree(want) if agree is not None else want)
        counts.append(n_it)
    rounds = max(1, rounds)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i, fn in enumerate(fns):
            per = counts[i] // rounds + (1 if r < counts[i] % rounds else 0)
            for _ in range(per):
                if device.type == "cuda":
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    ms = a.elapsed_time(b)
                else:
                    t0 = time.perf_counter()
                    fn()
                    ms = (time.perf_counter() - t0) * 1e3
                samples[i].append(reduce(ms) if reduce is not None else ms)
    return [statistics.median(s) for s in samples]


def _timed(cfg, fn, device) -> float:
    """``time_fn`` with the run's settings, agreed and maximised over ranks."""
    ms = time_fn(fn, device, cfg.warmup, cfg.iters, getattr(cfg, "min_total_ms", 0.0),
                 agree=lambda x: _max_over_ranks(x, device, cfg.group))
    return _max_over_ranks(ms, device, cfg.group)


def _max_over_ranks(x: float, device, group=None) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def environment(device) -> dict[str, Any]:
    """Versions and card for the records."""
    import torch

    env = {"torch": torch.__version__, "date": datetime.date.today().isoformat()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["cudnn"] = str(torch.backends.cudnn.version())
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    return env


def _shard_index(seq: int, n: int, rank: int, causal: bool, device):
    import torch

    if causal:
        blk = seq // (2 * n)
        return torch.cat([torch.arange(rank * blk, (rank + 1) * blk, device=device),
                          torch.arange((2 * n - 1 - rank) * blk, (2 * n - rank) * blk, device=device)])
    per = seq // n
    return torch.arange(rank * per, (rank + 1) * per, device=device)


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench_torch_cp(cfg: argparse.Namespace, world: int, device, env: dict, shape: dict, mesh) -> list[dict]:
    """PyTorch native CP (all-gather and all-to-all rotation) on one shape."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    tokens, hq, hkv, causal = shape["tokens"], shape["hq"], shape["hkv"], shape["causal"]
    seq = tokens * world
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device=device).manual_seed(1234 + tokens + 7 * hkv + int(causal))
    q, k, v, do = (torch.randn(seq, cfg.batch, h, cfg.head_dim, device=device, dtype=dtype, generator=gen)
                   for h in (hq, hkv, hkv, hq))
    ref = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), is_causal=causal,
                                         enable_gqa=hq != hkv)
    base = {"cp": world, "tokens_per_gpu": tokens, "heads_q": hq, "heads_kv": hkv, "head_dim": cfg.head_dim,
            "batch": cfg.batch, "causal": causal, "dtype": cfg.dtype, **env}
    records = []
    for method in ("allgather", "alltoall"):
        impl = f"torch_cp_{method}"
        if impl not in cfg.impls:
            continue
        try:
            records.extend(_torch_cp(method, mesh, q, k, v, do, causal, cfg, device, base, world, seq, ref))
        except Exception as exc:  # noqa: BLE001
            records.append({**base, "impl": impl, "num_rings": 0, "error": repr(exc)[:500]})
    dist.barrier(group=cfg.group)
    return records


def bench_shape(cfg: argparse.Namespace, rank: int, world: int, device, env: dict, shape: dict) -> list[dict]:
    """All implementations and passes for one shape; returns records (identical on every rank)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_tasp.attention import tasp_attention, tasp_run_summary
    from megatron_tasp.topology import max_rings

    tokens, hq, hkv, causal = shape["tokens"], shape["hq"], shape["hkv"], shape["causal"]
    b, d, n = cfg.batch, cfg.head_dim, world
    seq = tokens * n
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device=device).manual_seed(1234 + tokens + 7 * hkv + int(causal))
    q, k, v, do = (torch.randn(seq, b, h, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv, hq))
    idx = _shard_index(seq, n, rank, causal, device)
    ql, kl, vl, dol = (x.index_select(0, idx).requires_grad_(x is not do) for x in (q, k, v, do))
    base = {"cp": n, "tokens_per_gpu": tokens, "heads_q": hq, "heads_kv": hkv, "head_dim": d, "batch": b,
            "causal": causal, "dtype": cfg.dtype, "dkv_scheme": DKV_SCHEME, **env}
    records: list[dict] = []

    # reference: single-device attention over the whole sequence
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, enable_gqa=hq != hkv)
    ref_local = ref.permute(2, 0, 1, 3).index_select(0, idx)

    ring_counts = cfg.num_rings or sorted({1, max_rings(n)}) if n > 1 else [1]
    keeps = getattr(cfg, "keep_kv", None) or ["auto"]
    variants = [("tasp", k_, t, c, kp) for k_ in ring_counts for t in cfg.transports for c in cfg.chunks
                for kp in keeps if not (t == "symm" and kp is True)] if n > 1 else []
    if "compute_only" in cfg.impls and n > 1:  # the bound; per chunk count and KV mode, as TASP runs them
        variants.extend(("compute_only", max(ring_counts), "none", c, kp) for c in cfg.chunks for kp in keeps)
    jobs: list[tuple[dict, Callable[[], Any]]] = []  # timed together, round-robin (see time_round_robin)
    for impl, k_, transport, chunks, keep in variants:
        if impl == "tasp" and "tasp" not in cfg.impls:
            continue

        def fwd(k_=k_, transport=transport, chunks=chunks, keep=keep):
            return tasp_attention(ql, kl, vl, cfg.group, causal=causal, num_rings=k_, transport=transport,
                                  kernel=cfg.kernel, chunks=chunks, keep_kv=keep)
        try:
            out = fwd()
            err = _rel_err(out, ref_local) if impl == "tasp" else None
            del out
            resolved = tasp_run_summary(ql, kl, vl, cfg.group, causal=causal, num_rings=k_, transport=transport,
                                        kernel=cfg.kernel, chunks=chunks, keep_kv=keep)
            for passes in cfg.passes:
                fn = fwd if passes == "fwd" else _fwd_bwd(fwd, dol, (ql, kl, vl))
                peak = None
                for _ in range(max(1, cfg.warmup)):
                    if device.type == "cuda":  # memory the call needs on top of its inputs (buffers, grads)
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        before = torch.cuda.memory_allocated(device)
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                jobs.append(({**base, "impl": impl, "num_rings": resolved["num_rings"], "transport": transport,
                              "chunks": resolved["chunks"], "keep_kv": resolved["keep_kv"],
                              "kernel": resolved["kernel"],
                              "requested": {"num_rings": k_, "chunks": chunks, "keep_kv": keep}, "pass": passes,
                              "max_rel_err": err, "extra_mem_mb": peak}, fn))
        except Exception as exc:  # noqa: BLE001 - record and keep going
            records.append({**base, "impl": impl, "num_rings": k_, "transport": transport, "chunks": chunks,
                            "keep_kv": keep, "error": repr(exc)})
    if jobs:
        times = time_round_robin([fn for _, fn in jobs], device, cfg.iters, getattr(cfg, "rounds", 1),
                                 getattr(cfg, "min_total_ms", 0.0),
                                 agree=lambda x: _max_over_ranks(x, device, cfg.group),
                                 reduce=lambda x: _max_over_ranks(x, device, cfg.group))
        for (rec, _), ms in zip(jobs, times):
            fl = attention_flops(seq, b, hq, d, causal, rec["pass"]) / n
            records.append({**rec, "time_ms": ms, "tflops_per_gpu": fl / ms / 1e9})

    if "single_gpu" in cfg.impls and device.type == "cuda":  # memory baseline: one-device attention, local shard
        ql2, kl2, vl2 = (x.detach().permute(1, 2, 0, 3).clone().requires_grad_() for x in (ql, kl, vl))
        dol2 = dol.permute(1, 2, 0, 3)
        for passes in cfg.passes:
            fn = (lambda: F.scaled_dot_product_attention(ql2, kl2, vl2, is_causal=causal, enable_gqa=hq != hkv)) \
                if passes == "fwd" else _fwd_bwd(lambda: F.scaled_dot_product_attention(
                    ql2, kl2, vl2, is_causal=causal, enable_gqa=hq != hkv), dol2, (ql2, kl2, vl2))
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            records.append({**base, "impl": "local_attention_memory", "num_rings": 0, "pass": passes,
                            "extra_mem_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
                            "note": "plain attention on this rank's shard: the memory baseline, not timed"})
        del ql2, kl2, vl2
    if "single_gpu" in cfg.impls:
        qs, ks, vs = (x.detach().clone().requires_grad_() for x in (qb, kb, vb))
        dos = do.permute(1, 2, 0, 3)

        def sfwd():
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=hq != hkv)
        for passes in cfg.passes:
            fn = sfwd if passes == "fwd" else _fwd_bwd(sfwd, dos, (qs, ks, vs))
            ms = _timed(cfg, fn, device)
            fl = attention_flops(seq, b, hq, d, causal, passes)
            records.append({**base, "cp": 1, "impl": "single_gpu", "num_rings": 0, "pass": passes,
                            "tokens_per_gpu": seq, "time_ms": ms, "tflops_per_gpu": fl / ms / 1e9,
                            "note": f"whole sequence ({seq} tokens) on one GPU: the same total work as the CP run"})
        del qs, ks, vs

    dist.barrier(group=cfg.group)
    return records


def _fwd_bwd(fwd, dout, leaves):
    def fn():
        for t in leaves:
            t.grad = None
        fwd().backward(dout)
    return fn


def _torch_cp(method, mesh, q, k, v, do, causal, cfg, device, base, n, seq, ref) -> list[dict]:
    """PyTorch's native context parallel (ring attention with all-gather or all-to-all rotation)."""
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import _attention as cp_attention
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    hq, hkv = q.shape[2], k.shape[2]
    g = hq // hkv
    opts = getattr(cp_attention, "_cp_options", None)
    if opts is not None and hasattr(opts, "enable_load_balance"):
        opts.enable_load_balance = causal  # its load balancer only supports causal masks
    # PyTorch CP takes [b, h, S, d]; GQA is expanded before it, as its users (torchtitan) do.
    qg, kg, vg, dog = (x.permute(1, 2, 0, 3).contiguous() for x in (q, k, v, do))
    if g > 1:
        kg, vg = (x.repeat_interleave(g, dim=1) for x in (kg, vg))
    ref_g = ref.contiguous()
    set_rotate_method(method)
    records = []
    bufs = [qg, kg, vg, dog, ref_g]
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 5, no_restore_buffers=set(bufs)):
        for t in (qg, kg, vg):
            t.requires_grad_()

        def fwd():
            return F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        err = _rel_err(fwd(), ref_g)
        for passes in cfg.passes:
            fn = fwd if passes == "fwd" else _fwd_bwd(fwd, dog, (qg, kg, vg))
            ms = _timed(cfg, fn, device)
            fl = attention_flops(seq, cfg.batch, hq, q.shape[3], causal, passes) / n
            records.append({**base, "impl": f"torch_cp_{method}", "num_rings": 1, "pass": passes, "time_ms": ms,
                            "tflops_per_gpu": fl / ms / 1e9, "max_rel_err": err,
                            "note": "GQA K/V expanded to query heads before CP" if g > 1 else ""})
    return records


def transport_sweep(cfg: argparse.Namespace, rank: int, world: int, device, env: dict) -> list[dict]:
    """Bidirectional exchange bandwidth: one message per peer, k messages to one peer, all_to_all_single."""
    import torch
    import torch.distributed as dist

    records = []
    peers = [p for p in range(world) if p != rank]
    for size in cfg.msg_sizes:
        numel = size // 2
        modes = [("p2p_one_peer", 1), ("a2a_single", 1)]
        modes += [("p2p_same_peer_split", k_) for k_ in (2, 4, 7)]
        if world > 2:
            modes += [("p2p_k_peers", len(peers)), ("a2a_k_peers", len(peers))]
        for mode, parts in modes:
            send = torch.randn(numel, device=device, dtype=torch.bfloat16)
            recv = torch.empty_like(send)
            nxt, prv = (rank + 1) % world, (rank - 1) % world

            def run(mode=mode, parts=parts, send=send, recv=recv, nxt=nxt, prv=prv, numel=numel):
                if mode == "a2a_single":
                    splits = [0] * world
                    splits[nxt] = numel
                    rsplits = [0] * world
                    rsplits[prv] = numel
                    dist.all_to_all_single(recv, send, rsplits, splits)
                    return
                if mode == "a2a_k_peers":
                    sp = [0 if p == rank else numel // len(peers) for p in range(world)]
                    dist.all_to_all_single(recv[:sum(sp)], send[:sum(sp)], sp, sp)
                    return
                ops = []
                if mode == "p2p_k_peers":
                    chunk = numel // len(peers)
                    for j, p in enumerate(peers):
                        ops.append(dist.P2POp(dist.isend, send[j * chunk:(j + 1) * chunk], p))
                        ops.append(dist.P2POp(dist.irecv, recv[j * chunk:(j + 1) * chunk], p))
                else:
                    chunk = numel // parts
                    for j in range(parts):
                        ops.append(dist.P2POp(dist.isend, send[j * chunk:(j + 1) * chunk], nxt))
                        ops.append(dist.P2POp(dist.irecv, recv[j * chunk:(j + 1) * chunk], prv))
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            ms = _max_over_ranks(time_fn(run, device, cfg.warmup, cfg.iters), device)
            records.append({"kind": "transport", "impl": mode, "messages": parts, "bytes": size, "cp": world,
                            "time_ms": ms, "GBps_per_direction": size / ms / 1e6, **env})
    return records


def run_bench(cfg: argparse.Namespace, rank: int, world: int) -> list[dict]:
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
    records: list[dict] = []
    bar = _progress(len(shapes) * (2 if mesh is not None else 1), rank, "shapes")
    for shape in shapes:
        records.extend(bench_shape(cfg, rank, world, device, env, shape))
        bar.update(1)
        if rank == 0 and cfg.out:  # keep what is measured even if the run is cut short
            _write(cfg.out, records)
    if mesh is not None:  # PyTorch CP patches SDPA dispatch: run it after all of our own measurements
        for shape in shapes:
            records.extend(bench_torch_cp(cfg, world, device, env, shape, mesh))
            bar.update(1)
            if rank == 0 and cfg.out:
                _write(cfg.out, records)
        if device.type == "cuda":
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


def _progress(total: int, rank: int, desc: str):
    if rank != 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="shape")


def _write(path: str, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)


def _cpu_worker(rank: int, world: int, cfg: argparse.Namespace) -> list[dict]:
    return run_bench(cfg, rank, world)


def cmd_bench(args: argparse.Namespace) -> int:
    """Entry of ``megatron-tasp bench``."""
    args.tokens = _parse_tokens(args.tokens)
    args.heads = _parse_heads(args.heads)
    args.causal = {"both": [True, False], "causal": [True], "none": [False]}[args.mask]
    args.passes = _parse_list(args.passes, str)
    args.impls = _parse_list(args.impls, str)
    args.transports = _parse_list(args.transports, str)
    args.num_rings = _parse_list(args.num_rings, int) if args.num_rings else None
    args.chunks = [c if c == "auto" else int(c) for c in _parse_list(args.chunks, str)]
    from megatron_tasp.options import parse_keep_kv

    args.keep_kv = [parse_keep_kv(x) for x in _parse_list(args.keep_kv, str)]
    args.msg_sizes = [int(float(x) * 2**20) for x in args.msg_sizes_mb.split(",")]
    bad = [i for i in args.impls if i not in IMPLS]
    if bad:
        raise ValueError(f"unknown --impls {bad}; choose from {', '.join(IMPLS)}")
    if args.device == "cpu":
        from megatron_tasp.testing.dist import run_workers

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
        if dist.get_rank() != 0:
            dist.destroy_process_group()
            return 0
        dist.destroy_process_group()
    if args.out:
        _write(args.out, records)
        print(f"wrote {len(records)} records to {args.out}")
    for r in records:
        if "error" in r:
            print(f"ERROR {r['impl']} tokens={r.get('tokens_per_gpu')}: {r['error'][:200]}")
        elif "time_ms" not in r:
            print(f"{r['impl']:<20} tok={r['tokens_per_gpu']:>6} {r['pass']:<7} "
                  f"extra memory {r['extra_mem_mb']:.0f} MiB")
        elif r.get("kind") == "transport":
            print(f"{r['impl']:<22} {r['bytes'] / 2**20:8.2f} MiB  {r['GBps_per_direction']:8.1f} GB/s")
        else:
            err = f" err={r['max_rel_err']:.1e}" if r.get("max_rel_err") is not None else ""
            kept = {True: "kept", False: "sent"}.get(r.get("keep_kv"), "-")
            print(f"{r['impl']:<20} k={r['num_rings']} {r.get('transport', ''):<5} c={r.get('chunks', '-')} "
                  f"kv={kept:<4} tok={r['tokens_per_gpu']:>6} "
                  f"h={r['heads_q']}/{r['heads_kv']} causal={int(r['causal'])} {r['pass']:<7} "
                  f"{r['time_ms']:9.3f} ms {r['tflops_per_gpu']:7.1f} TFLOP/s{err}")
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
    p.add_argument("--num-rings", default="", help="ring counts for TASP (default: 1 and the maximum)")
    p.add_argument("--transports", default="a2a,p2p", help="TASP transports to time")
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
