"""Profile one TASP forward+backward on GPUs (torchrun): host syncs, CPU overhead, kernel time.

    torchrun --nproc-per-node 2 scripts/gpu_profile_attention.py --tokens 1024,8192 --out-dir DIR
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

import torch
import torch.distributed as dist

from megatron_tasp import tasp_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,8192")
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--out-dir", default=".")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    hq, hkv = (int(x) for x in args.heads.split("/"))
    g = dist.group.WORLD
    for tokens in (int(t) for t in args.tokens.split(",")):
        q = torch.randn(tokens, 1, hq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(tokens, 1, hkv, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(tokens, 1, hkv, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)

        def step(q=q, k=k, v=v, do=do):
            tasp_attention(q, k, v, g).backward(do)

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
            tasp_attention(q, k, v, g)
        cpu_fwd = (time.perf_counter() - t0) / 10 * 1e3  # host time to enqueue one forward
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        if rank == 0:
            with open(os.path.join(args.out_dir, f"profile_{tokens}.txt"), "w") as f:
                f.write(f"tokens/GPU {tokens}, heads {hq}/{hkv}; host enqueue time per forward {cpu_fwd:.3f} ms\n")
                f.write(f"host sync check: {sync}\n\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
                f.write("\n\n")
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
            print(f"tokens {tokens}: host enqueue per forward {cpu_fwd:.3f} ms; sync: {sync[:300]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
