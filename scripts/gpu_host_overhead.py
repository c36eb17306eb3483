"""Host (CPU) cost of enqueuing TASP and its building blocks on GPUs (torchrun, 2+ ranks).

Small attention shapes are host-bound: the GPU waits for Python and the CUDA/NCCL launch path. This
measures what one call costs the host while the GPU is kept busy (a sleep kernel queued first, few
repetitions so that the launch queue never fills), block by block, and profiles a whole call.

    torchrun --nproc-per-node 2 scripts/gpu_host_overhead.py --out host.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tasp import tasp_attention
from megatron_tasp.kernels import get_kernel, merge_finite_


def host_us(fn, reps: int = 4, trials: int = 9) -> float:
    """Median host microseconds per call of ``fn`` with the GPU busy."""
    fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(trials):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time, longer than the calls below take to enqueue
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        res.append((time.perf_counter() - t0) / reps * 1e6)
        torch.cuda.synchronize()
    return statistics.median(res)


def measure(tokens: int, rank: int, n: int, g, dev) -> tuple[dict, object]:
    """Host cost of every block at one shape (MHA 32 heads, d=128, bf16, causal); returns rows and the
    whole-call function to profile."""
    q = torch.randn(tokens, 1, 32, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, 1, 32, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, 1, 32, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    qb, kb, vb = (x.detach().permute(1, 2, 0, 3) for x in (q, k, v))
    kern = get_kernel("cudnn", dev, torch.bfloat16, 128)
    o, lse, ctx = kern.forward(qb, kb, vb, causal=True, scale=0.088)
    acc, lacc = o.float(), lse.clone()
    flat = torch.empty(2 * tokens * 32 * 128, device=dev, dtype=torch.bfloat16)
    recv = torch.empty_like(flat)
    splits = [0] * n
    splits[(rank + 1) % n] = flat.numel()
    rsplits = [0] * n
    rsplits[(rank - 1) % n] = flat.numel()
    works: list = []

    def a2a_issue():
        works.append(dist.all_to_all_single(recv, flat, rsplits, splits, group=g, async_op=True))

    def a2a_issue_wait():
        dist.all_to_all_single(recv, flat, rsplits, splits, group=g, async_op=True).wait()

    def p2p_issue_wait():
        ops = [dist.P2POp(dist.isend, flat, (rank + 1) % n, g), dist.P2POp(dist.irecv, recv, (rank - 1) % n, g)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    qg, kg, vg = (x.detach().permute(1, 2, 0, 3).requires_grad_() for x in (q, k, v))
    dog = do.permute(1, 2, 0, 3)

    def sdpa_fwd_bwd():
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(dog)

    def tasp(backward: bool, transport=None, chunks=1):
        def fn():
            o_ = tasp_attention(q, k, v, g, transport=transport, chunks=chunks)
            if backward:
                o_.backward(do)
        return fn
    blocks = {
        "empty_alloc": lambda: torch.empty(1 << 20, device=dev),
        "copy_kernel": lambda: recv.copy_(flat),
        "sdpa_public_fwd": lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True),
        "sdpa_public_fwd_bwd": sdpa_fwd_bwd,
        "kernel_forward": lambda: kern.forward(qb, kb, vb, causal=True, scale=0.088),
        "kernel_backward": lambda: kern.backward(qb, qb, kb, vb, o, lse, ctx, causal=True, scale=0.088),
        "merge_finite": lambda: merge_finite_(acc, lacc, o, lse),
        "a2a_issue_only": a2a_issue,
        "a2a_issue_wait": a2a_issue_wait,
        "p2p_batch_issue_wait": p2p_issue_wait,
        "tasp_fwd": tasp(False),
        "tasp_fwd_bwd": tasp(True),
        "tasp_fwd_bwd_chunks2": tasp(True, chunks=2),
        "tasp_fwd_symm": tasp(False, "symm"),
        "tasp_fwd_bwd_symm": tasp(True, "symm"),
        "compute_only_fwd": tasp(False, "none"),
        "compute_only_fwd_bwd": tasp(True, "none"),
    }
    rows = {}
    for name, fn in blocks.items():
        rows[name] = host_us(fn)
        for w in works:
            w.wait()
        works.clear()
        dist.barrier()
    return rows, tasp(True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--out", default="host.json")
    ap.add_argument("--label", default="default")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    g = dist.group.WORLD
    dev = torch.device("cuda", torch.cuda.current_device())
    out: dict = {"label": args.label, "env": {k: v for k, v in os.environ.items() if k.startswith(("TORCH_NCCL",
                                                                                                "NCCL_"))},
                 "torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": {}}
    for tokens in (int(t) for t in args.tokens.split(",")):
        rows, fn = measure(tokens, rank, n, g, dev)
        fn()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        for _ in range(5):
            torch.cuda._sleep(200_000_000)
            pr.enable()
            for _ in range(4):
                fn()
            pr.disable()
            torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
        out["rows"][tokens] = rows
        out[f"cprofile_{tokens}"] = buf.getvalue()
        if rank == 0:
            print(tokens, json.dumps({k_: round(v_, 1) for k_, v_ in rows.items()}), flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
