"""PyTorch's native context parallel (all-gather and all-to-all rotation) and the transport sweep."""

from __future__ import annotations

import argparse
from typing import Any

from megatron_tasp.apps.bench.timing import max_over_ranks, time_fn
from megatron_tasp.costmodel.records import BenchRecord, attention_flops

__all__ = ["bench_torch_cp", "transport_sweep"]


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def fwd_bwd(fwd, dout, leaves):
    """A callable running ``fwd().backward(dout)`` with the leaves' gradients reset first."""
    def fn():
        for t in leaves:
            t.grad = None
        fwd().backward(dout)
    return fn


def timed(cfg: argparse.Namespace, fn, device) -> float:
    """``time_fn`` with the run's settings, agreed and maximised over ranks."""
    ms = time_fn(fn, device, cfg.warmup, cfg.iters, getattr(cfg, "min_total_ms", 0.0),
                 agree=lambda x: max_over_ranks(x, device, cfg.group))
    return max_over_ranks(ms, device, cfg.group)


def bench_torch_cp(cfg: argparse.Namespace, world: int, device, env: dict, shape: dict, mesh) -> list[BenchRecord]:
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
    base: dict[str, Any] = {"cp": world, "tokens_per_gpu": tokens, "heads_q": hq, "heads_kv": hkv,
                            "head_dim": cfg.head_dim, "batch": cfg.batch, "causal": causal, "dtype": cfg.dtype, **env}
    records: list[BenchRecord] = []
    for method in ("allgather", "alltoall"):
        impl = f"torch_cp_{method}"
        if impl not in cfg.impls:
            continue
        try:
            records.extend(_torch_cp(method, mesh, q, k, v, do, causal, cfg, device, base, world, seq, ref))
        except Exception as exc:  # noqa: BLE001 - record and keep going
            records.append(BenchRecord(**base, impl=impl, error=repr(exc)[:500]))
    dist.barrier(group=cfg.group)
    return records


def _torch_cp(method, mesh, q, k, v, do, causal, cfg, device, base, n, seq, ref) -> list[BenchRecord]:
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
            fn = fwd if passes == "fwd" else fwd_bwd(fwd, dog, (qg, kg, vg))
            ms = timed(cfg, fn, device)
            fl = attention_flops(seq, cfg.batch, hq, q.shape[3], causal, passes) / n
            records.append(BenchRecord(**base, impl=f"torch_cp_{method}", num_rings=1, passes=passes, time_ms=ms,
                                       tflops_per_gpu=fl / ms / 1e9, max_rel_err=err,
                                       note="GQA K/V expanded to query heads before CP" if g > 1 else ""))
    return records


def _exchange(mode: str, parts: int, send, recv, rank: int, world: int):
    """One exchange of the sweep: a2a to the next rank, a2a to all peers, or batched p2p."""
    import torch.distributed as dist

    numel, peers = send.numel(), [p for p in range(world) if p != rank]
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if mode == "a2a_single":
        splits, rsplits = [0] * world, [0] * world
        splits[nxt], rsplits[prv] = numel, numel
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


def transport_sweep(cfg: argparse.Namespace, rank: int, world: int, device, env: dict) -> list[BenchRecord]:
    """Bidirectional exchange bandwidth: one message per peer, k messages to one peer, all_to_all_single."""
    import torch

    records = []
    for size in cfg.msg_sizes:
        modes = [("p2p_one_peer", 1), ("a2a_single", 1)] + [("p2p_same_peer_split", k) for k in (2, 4, 7)]
        if world > 2:
            modes += [("p2p_k_peers", world - 1), ("a2a_k_peers", world - 1)]
        for mode, parts in modes:
            send = torch.randn(size // 2, device=device, dtype=torch.bfloat16)
            recv = torch.empty_like(send)

            def run(mode=mode, parts=parts, send=send, recv=recv):
                _exchange(mode, parts, send, recv, rank, world)
            ms = max_over_ranks(time_fn(run, device, cfg.warmup, cfg.iters), device)
            records.append(BenchRecord(kind="transport", impl=mode, messages=parts, bytes=size, cp=world, time_ms=ms,
                                       GBps_per_direction=size / ms / 1e6, **env))
    return records
