"""Kept vs sent KV (and transports) for causal fwd+bwd, timed interleaved on GPUs (torchrun, 2+ ranks).

Variants of one shape take turns in rounds (10 calls of each, then the next round), so that drift of the
machine falls on all of them alike. Each sample is one call between CUDA events with a synchronisation
after it (as ``megatron-tasp bench``), max over ranks; the median is reported.

    torchrun --nproc-per-node 2 scripts/gpu_interleaved_ab.py --shapes 1024/32,4096/8 --out ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

from megatron_tasp import tasp_attention

VARIANTS = (("none", True), ("none", False), ("a2a", True), ("a2a", False), ("symm", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1024/32,1024/8,2048/8,4096/32,4096/8,8192/8",
                    help="tokens per GPU / KV heads (32 query heads, head dim 128, bf16), comma list")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--out", default="ab.json")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, g = dist.get_rank(), dist.group.WORLD
    dev = torch.device("cuda", torch.cuda.current_device())
    res = {}
    for tok, hkv in ((int(t), int(h)) for t, h in (x.split("/") for x in args.shapes.split(","))):
        q = torch.randn(tok, 1, 32, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(tok, 1, hkv, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        do = torch.randn_like(q)
        fns = {}
        for tr, keep in VARIANTS:
            def fb(tr=tr, keep=keep, q=q, k=k, v=v, do=do):
                for t in (q, k, v):
                    t.grad = None
                tasp_attention(q, k, v, g, transport=tr, keep_kv=keep).backward(do)
            for _ in range(5):
                fb()
            fns[f"{tr}{'_keep' if keep else ''}"] = fb
        samples: dict[str, list[float]] = {name: [] for name in fns}
        torch.cuda.synchronize()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                for _ in range(args.per_round):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    t = torch.tensor([a.elapsed_time(b)], device=dev)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    samples[name].append(float(t))
        med = {name: statistics.median(s) for name, s in samples.items()}
        res[f"{tok}/{hkv}"] = med
        if rank == 0:
            best = min(med["none"], med["none_keep"])
            print(tok, hkv, {n: round(m, 3) for n, m in med.items()},
                  {n: round(m / best, 3) for n, m in med.items() if not n.startswith("none")}, flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
