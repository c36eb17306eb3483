"""One shape of ``megatron-tasp bench``: TASP variants, compute_only, kernel_bound and single GPU.

TASP and its bounds are timed together, round-robin (``time_round_robin``), each variant verified first.
Every TASP call gets its settings as one :class:`~megatron_tasp.options.TaspOptions`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from megatron_tasp.apps.bench.kernel_bound import block_work, kernel_bound_fn
from megatron_tasp.apps.bench.timing import max_over_ranks, time_round_robin
from megatron_tasp.apps.bench.torch_cp import _rel_err, fwd_bwd, timed
from megatron_tasp.costmodel.records import BenchRecord, attention_flops
from megatron_tasp.options import TaspOptionError, TaspOptions
from megatron_tasp.topology import max_rings

__all__ = ["bench_shape", "shard_index", "tasp_variants"]


def shard_index(seq: int, n: int, rank: int, causal: bool, device):
    """Token indices of ``rank``'s shard: Megatron's zigzag split when causal, contiguous otherwise."""
    import torch

    if causal:
        blk = seq // (2 * n)
        return torch.cat([torch.arange(rank * blk, (rank + 1) * blk, device=device),
                          torch.arange((2 * n - 1 - rank) * blk, (2 * n - rank) * blk, device=device)])
    per = seq // n
    return torch.arange(rank * per, (rank + 1) * per, device=device)


def tasp_variants(cfg: argparse.Namespace, n: int) -> list[tuple[str, TaspOptions, str | None]]:
    """(impl, options, transport keyword) of every TASP and compute_only run of a shape; compute_only passes
    transport='none' explicitly (a local copy instead of an exchange), which explicit keywords allow."""
    if n < 2:
        return []
    base: TaspOptions = cfg.options
    rings = cfg.num_rings or sorted({1, max_rings(n)})
    out: list[tuple[str, TaspOptions, str | None]] = []
    for k in rings:
        for t in cfg.transports:
            for c in cfg.chunks:
                for keep in cfg.keep_kv:
                    try:
                        out.append(("tasp", base.replace(num_rings=k, transport=t, chunks=c, keep_kv=keep), None))
                    except TaspOptionError:  # e.g. symm with keep_kv=True: not a runnable combination
                        continue
    if "compute_only" in cfg.impls:  # the bound; per chunk count and KV mode, as TASP runs them
        top = max((k for k in rings if isinstance(k, int)), default=1)
        out += [("compute_only", base.replace(num_rings=top, chunks=c, keep_kv=keep), "none")
                for c in cfg.chunks for keep in cfg.keep_kv]
    return [v for v in out if v[0] in cfg.impls]


def _peak_extra_mb(fn: Callable[[], Any], device, repeats: int) -> float | None:
    """Memory the call needs on top of its inputs (buffers, grads), in MiB (CUDA only); runs ``fn``."""
    import torch

    peak = None
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return peak


def bench_shape(cfg: argparse.Namespace, rank: int, world: int, device, env: dict, shape: dict) -> list[BenchRecord]:
    """All implementations and passes for one shape; returns records (identical on every rank)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_tasp import tasp_attention, tasp_run_summary
    from megatron_tasp.kernels import get_kernel

    tokens, hq, hkv, causal = shape["tokens"], shape["hq"], shape["hkv"], shape["causal"]
    b, d, n = cfg.batch, cfg.head_dim, world
    seq = tokens * n
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device=device).manual_seed(1234 + tokens + 7 * hkv + int(causal))
    q, k, v, do = (torch.randn(seq, b, h, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv, hq))
    idx = shard_index(seq, n, rank, causal, device)
    ql, kl, vl, dol = (x.index_select(0, idx).requires_grad_(x is not do) for x in (q, k, v, do))
    base: dict[str, Any] = {"cp": n, "tokens_per_gpu": tokens, "heads_q": hq, "heads_kv": hkv, "head_dim": d,
                            "batch": b, "causal": causal, "dtype": cfg.dtype, **env}
    records: list[BenchRecord] = []
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # reference: one device over the whole sequence
    ref_local = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, enable_gqa=hq != hkv
                                               ).permute(2, 0, 1, 3).index_select(0, idx)
    jobs: list[tuple[BenchRecord, Callable[[], Any]]] = []  # timed together, round-robin
    for impl, opts, transport in tasp_variants(cfg, n):
        def fwd(opts=opts, transport=transport):
            return tasp_attention(ql, kl, vl, cfg.group, causal=causal, transport=transport, options=opts)
        asked = {"num_rings": opts.num_rings, "chunks": opts.chunks, "keep_kv": opts.keep_kv}
        try:
            out = fwd()
            err = _rel_err(out, ref_local) if impl == "tasp" else None
            del out
            ran = tasp_run_summary(ql, kl, vl, cfg.group, causal=causal, transport=transport, options=opts)
            for passes in cfg.passes:
                fn = fwd if passes == "fwd" else fwd_bwd(fwd, dol, (ql, kl, vl))
                jobs.append((BenchRecord(**base, impl=impl, num_rings=ran["num_rings"], transport=ran["transport"],
                                         chunks=ran["chunks"], keep_kv=ran["keep_kv"], dkv_dtype=opts.dkv_dtype,
                                         kernel=ran["kernel"], requested=asked, passes=passes, max_rel_err=err,
                                         extra_mem_mb=_peak_extra_mb(fn, device, cfg.warmup)), fn))
        except Exception as exc:  # noqa: BLE001 - record and keep going
            records.append(BenchRecord(**base, impl=impl, num_rings=opts.num_rings if isinstance(
                opts.num_rings, int) else 0, transport=transport or opts.transport, requested=asked,
                error=repr(exc)[:500]))
    if "kernel_bound" in cfg.impls and n > 1:
        kernel = get_kernel(cfg.options.kernel, device, dtype, d)
        bhsd = [x.detach().permute(1, 2, 0, 3) for x in (ql, kl, vl, dol)]
        blocks = block_work(tokens, n, rank, causal)
        for passes in cfg.passes:
            fn = kernel_bound_fn(kernel, *bhsd, blocks, passes, d ** -0.5)
            fn()
            jobs.append((BenchRecord(**base, impl="kernel_bound", transport="none", kernel=kernel.name, passes=passes,
                                     note="the block kernels of one TASP call (one ring) alone: no merge, no "
                                          "engine, no communication"), fn))
    if jobs:
        times = time_round_robin([fn for _, fn in jobs], device, cfg.iters, cfg.rounds, cfg.min_total_ms,
                                 agree=lambda x: max_over_ranks(x, device, cfg.group),
                                 reduce=lambda x: max_over_ranks(x, device, cfg.group))
        for (rec, _), ms in zip(jobs, times):
            rec.time_ms, rec.tflops_per_gpu = ms, rec.flops() / n / ms / 1e9
            records.append(rec)
    if "single_gpu" in cfg.impls:
        records += _single_gpu(cfg, device, base, (ql, kl, vl, dol), (qb, kb, vb, do), seq)
    dist.barrier(group=cfg.group)
    return records


def _single_gpu(cfg, device, base: dict, local: tuple, whole: tuple, seq: int) -> list[BenchRecord]:
    """Plain attention: the local shard (memory baseline, CUDA only, not timed) and the whole sequence on one
    device (timed: the same total work as the CP run)."""
    import torch
    import torch.nn.functional as F

    gqa = base["heads_q"] != base["heads_kv"]
    causal = base["causal"]
    out: list[BenchRecord] = []
    if device.type == "cuda":
        ql, kl, vl, dol = local
        q2, k2, v2 = (x.detach().permute(1, 2, 0, 3).clone().requires_grad_() for x in (ql, kl, vl))
        for passes in cfg.passes:
            def f2():
                return F.scaled_dot_product_attention(q2, k2, v2, is_causal=causal, enable_gqa=gqa)
            fn = f2 if passes == "fwd" else fwd_bwd(f2, dol.permute(1, 2, 0, 3), (q2, k2, v2))
            out.append(BenchRecord(**base, impl="local_attention_memory", passes=passes,
                                   extra_mem_mb=_peak_extra_mb(fn, device, 1),
                                   note="plain attention on this rank's shard: the memory baseline, not timed"))
        del q2, k2, v2
        torch.cuda.empty_cache()
    qb, kb, vb, do = whole
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (qb, kb, vb))

    def sfwd():
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa)
    for passes in cfg.passes:
        fn = sfwd if passes == "fwd" else fwd_bwd(sfwd, do.permute(1, 2, 0, 3), (qs, ks, vs))
        ms = timed(cfg, fn, device)
        fl = attention_flops(seq, base["batch"], base["heads_q"], base["head_dim"], causal, passes)
        out.append(BenchRecord(**{**base, "cp": 1, "tokens_per_gpu": seq}, impl="single_gpu", passes=passes,
                               time_ms=ms, tflops_per_gpu=fl / ms / 1e9,
                               note=f"whole sequence ({seq} tokens) on one GPU: the same total work as the CP run"))
    return out

