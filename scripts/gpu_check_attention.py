"""GPU equivalence check of TASP attention (launch with torchrun, one process per GPU).

For every CUDA block kernel, dtype, mask and head layout: TASP's out/dq/dk/dv shards are compared with
float32 single-device attention over the whole sequence (relative max error), next to the error of the
same kernel run on the whole sequence on one GPU. Also measures the dKV accumulator dtype's effect
(fp32 vs input dtype) and checks that a warmed-up forward+backward makes no host synchronisation.

    torchrun --nproc-per-node 2 scripts/gpu_check_attention.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from megatron_tasp import tasp_attention
from megatron_tasp.kernels import available_kernels
from megatron_tasp.options import TaspOptions, parse_keep_kv
from megatron_tasp.topology import max_rings


def reference(q, k, v, causal):
    """fp32 attention on one GPU: q [S, b, h, d], k/v [S, b, hkv, d] -> [S, b, h, d]."""
    g = q.shape[2] // k.shape[2]
    qf, kf, vf = (x.float().permute(1, 2, 0, 3) for x in (q, k, v))
    kf, vf = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    s = qf @ kf.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ vf).permute(2, 0, 1, 3)


def shard(seq, n, r, causal, device):
    if causal:
        blk = seq // (2 * n)
        return torch.cat([torch.arange(r * blk, (r + 1) * blk), torch.arange((2 * n - 1 - r) * blk, (2 * n - r) * blk)]
                         ).to(device)
    per = seq // n
    return torch.arange(r * per, (r + 1) * per, device=device)


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--seq-per-rank", type=int, default=2048)
    ap.add_argument("--chunks", default="1", help="comma list of TASP chunk counts to check")
    ap.add_argument("--kernels", default="cudnn,flash,efficient,math")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--transports", default="a2a", help="comma list of TASP transports to check")
    ap.add_argument("--keep-kv", default="auto", help="comma list of keep_kv settings to check (auto, 1, 0)")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    results = []
    names = ("out", "dq", "dk", "dv")
    seed = 0
    chunk_list = [int(c) for c in args.chunks.split(",")]
    keep_list = [parse_keep_kv(x) for x in args.keep_kv.split(",")]
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        kernels = [k for k in args.kernels.split(",") if k in available_kernels(dev, dtype, 128)]
        for kernel in kernels:
            for causal in (True, False):
                for hq, hkv in ((16, 16), (16, 4)):
                    for rings, chunks, tr, keep in ((r, c, t, kp) for r in sorted({1, max_rings(n)})
                                                    for c in chunk_list for t in args.transports.split(",")
                                                    for kp in keep_list):
                        if tr == "symm" and keep is True:
                            continue  # symm's persistent buffers cannot be kept (fails closed, tested on CPU)
                        seq = n * args.seq_per_rank
                        seed += 1  # identical on every rank (hash() is salted per process)
                        g = torch.Generator(device=dev).manual_seed(seed)
                        q, k, v, do = (torch.randn(seq, 2, h, 128, device=dev, dtype=dtype, generator=g)
                                       for h in (hq, hkv, hkv, hq))
                        ref = grads(lambda a, b_, c, causal=causal: reference(a, b_, c, causal),
                                    q.float(), k.float(), v.float(), do.float())
                        single = grads(lambda a, b_, c, causal=causal, kernel=kernel: tasp_attention(
                            a, b_, c, None, causal=causal, kernel=kernel),
                                       q, k, v, do)
                        idx = shard(seq, n, rank, causal, dev)
                        rec = {"kernel": kernel, "dtype": str(dtype), "causal": causal, "heads": f"{hq}/{hkv}",
                               "num_rings": rings, "chunks": chunks, "transport": tr, "keep_kv": keep, "cp": n,
                               "tokens_per_gpu": len(idx)}
                        for mode in ("fp32", "input"):
                            opts = TaspOptions(dkv_dtype=mode)
                            got = grads(lambda a, b_, c, causal=causal, rings=rings, kernel=kernel, chunks=chunks,
                                        tr=tr, keep=keep, opts=opts: tasp_attention(
                                            a, b_, c, dist.group.WORLD, causal=causal, options=opts, num_rings=rings,
                                            kernel=kernel, chunks=chunks, transport=tr, keep_kv=keep),
                                        q[idx], k[idx], v[idx], do[idx])
                            for j, nm in enumerate(names):
                                if mode == "input" and nm in ("out", "dq"):
                                    continue
                                e = torch.tensor([rel(got[j], ref[j][idx])], device=dev)
                                dist.all_reduce(e, op=dist.ReduceOp.MAX)
                                key = nm if mode == "fp32" else f"{nm}_dkv_input_dtype"
                                rec[f"err_{key}"] = float(e)
                        for j, nm in enumerate(names):
                            rec[f"single_gpu_err_{nm}"] = rel(single[j][idx], ref[j][idx])
                        rec["ok"] = all(rec[f"err_{nm}"] <= 2 * rec[f"single_gpu_err_{nm}"] + n ** 0.5 * 2 ** -8
                                        for nm in names)
                        results.append(rec)
                        if rank == 0:
                            print(json.dumps(rec), flush=True)
    # no host synchronisation inside a warmed-up forward+backward
    q = torch.randn(4096, 1, 16, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(4096, 1, 4, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    top, tr = max(chunk_list), args.transports.split(",")[-1]
    tasp_attention(q, kv, kv, dist.group.WORLD, chunks=top, transport=tr).sum().backward()
    torch.cuda.synchronize()
    sync_ok = True
    try:
        torch.cuda.set_sync_debug_mode("error")
        tasp_attention(q, kv, kv, dist.group.WORLD, chunks=top, transport=tr).sum().backward()
    except RuntimeError:
        import traceback

        sync_ok = f"host sync detected: {traceback.format_exc()}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    if rank == 0:
        summary = {"all_ok": all(r["ok"] for r in results), "no_host_sync": sync_ok, "cases": results,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "nccl": ".".join(map(str, torch.cuda.nccl.version())), "cudnn": torch.backends.cudnn.version()}
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print("ALL_OK" if summary["all_ok"] else "SOME_FAILED", "no_host_sync:", sync_ok)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
