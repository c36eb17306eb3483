"""Profile one TASP forward+backward on GPUs (torchrun): host syncs, CPU overhead, kernel time.

    torchrun --nproc-per-node 2 scripts/gpu_profile_attention.py --tokens 1024,8192 --out-dir DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
import traceback

import torch
import torch.distributed as dist

from megatron_tasp import tasp_attention


def host_ms(fn, reps: int = 20) -> float:
    """Host time to enqueue ``fn`` while the GPU is kept busy (a long sleep kernel queued first)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU time: nothing below waits for the GPU
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    ms = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    return ms


def host_report(q, k, v, do, g, rank: int, out_dir: str, tokens: int) -> None:
    """Enqueue cost of TASP vs compute-only vs plain SDPA, and where TASP's host time goes (cProfile)."""
    import torch.nn.functional as F

    def tasp(transport=None, backward=True, chunks=1):
        def fn():
            o = tasp_attention(q, k, v, g, transport=transport, chunks=chunks)
            if backward:
                o.backward(do)
        return fn

    qb, kb, vb, dob = (x.detach().permute(1, 2, 0, 3).requires_grad_() for x in (q, k, v, do))

    def sdpa(backward=True):
        def fn():
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
            if backward:
                o.backward(dob.detach())
        return fn
    rows = {}
    for name, fn in (("tasp_fwd", tasp(backward=False)), ("tasp_fwd_bwd", tasp()),
                     ("tasp_c2_fwd_bwd", tasp(chunks=2)),
                     ("compute_only_fwd", tasp("none", False)), ("compute_only_fwd_bwd", tasp("none")),
                     ("sdpa_local_fwd", sdpa(False)), ("sdpa_local_fwd_bwd", sdpa())):
        rows[name] = host_ms(fn)
    fn = tasp()
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(35)
    if rank == 0:
        with open(os.path.join(out_dir, f"host_{tokens}.txt"), "w") as f:
            f.write(f"tokens/GPU {tokens}; host enqueue ms per call (GPU kept busy):\n")
            for k_, v_ in rows.items():
                f.write(f"  {k_:<22} {v_:.3f}\n")
            f.write("\ncProfile of 20 TASP forward+backward calls, by own time:\n")
            f.write(buf.getvalue())
        print(rows, flush=True)


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
        host_report(q, k, v, do, g, rank, args.out_dir, tokens)
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
