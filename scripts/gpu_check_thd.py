"""Packed documents (THD) on GPUs: TASP's document-masked attention against one-device references, and its time.

Launch one process per GPU (``torchrun --nproc-per-node 2 scripts/gpu_check_thd.py --out thd.json``). For each
packed sequence (a long-tailed, log-normal document-length mix around ``--doc-mean`` tokens plus a few long
documents, each padded to a multiple of 2*CP), it checks out/dq/dk/dv of every rank's shard against fp32
document-masked attention over the whole sequence on one GPU (relative max error beside the same error of the
block kernel run on one GPU), then times forward+backward (CUDA events, median, max over ranks) of:
TASP packed at CP, the same packed sequence with the same mask on one GPU (a loop of per-document kernel
calls, ``one_gpu_packed``, and one varlen flash call, ``one_gpu_varlen``; the ratio uses the faster), and
dense causal TASP on the same tokens (``dense_causal``); ``--big-rows`` also times TASP packed with these values
of ``options.packed_dense_rows`` (large documents on the dense kernel), ``--packed-kernels`` with these values of
``options.packed_kernel`` (cuDNN's ragged pair or FlashAttention-2's). On CPU (gloo) it runs as a smoke test
with tiny shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics

import torch
import torch.distributed as dist

from megatron_tasp import tasp_attention
from megatron_tasp.apps.bench.timing import time_fn
from megatron_tasp.engine import thd as engine_thd
from megatron_tasp.kernels import varlen
from megatron_tasp.options import default_options
from megatron_tasp.thd import partition_index

LAUNCHES = {"varlen_forward": 0}


def _count_varlen() -> None:
    """Count the engine's varlen launches (shows which block kernel served the packed blocks): the engine's ops
    hook, wrapped once in this process before the first call."""
    pick = engine_thd._varlen_ops

    def counted(kernel, device, *rest):
        ops = pick(kernel, device, *rest)
        if ops is None:
            return None

        def fwd(*args):
            LAUNCHES["varlen_forward"] += 1
            return ops.forward(*args)

        return dataclasses.replace(ops, forward=fwd)

    engine_thd._varlen_ops = counted


def doc_lengths(total: int, mean: int, cp: int, seed: int) -> list[int]:
    """Log-normal lengths around ``mean`` plus two long documents, each a multiple of 2*cp, summing to total."""
    g = torch.Generator().manual_seed(seed)
    unit = 2 * cp
    lens: list[int] = []
    long_docs = [total // 4, total // 8]
    budget = total - sum(long_docs)
    while budget > 0:
        x = int(math.exp(math.log(mean) + 0.8 * float(torch.randn(1, generator=g))))
        x = max(1, min(x, budget))
        lens.append(x)
        budget -= -(-x // unit) * unit
    lens = long_docs + lens
    padded = [-(-x // unit) * unit for x in lens]
    while sum(padded) > total:
        padded.pop()
        lens.pop()
    padded[-1] += total - sum(padded)  # the last document absorbs the rest (still a multiple of 2*cp)
    return lens, padded


def cumsum(xs: list[int], device) -> torch.Tensor:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return torch.tensor(out, dtype=torch.int32, device=device)


def reference(q, k, v, lens, padded, causal):
    """fp32 document-masked attention on the whole packed sequence; padded rows are 0."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    g = q.shape[1] // k.shape[1]
    start = 0
    for n, p in zip(lens, padded):
        qs, ks, vs = (x[start:start + n].float().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        out[start:start + n] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal).transpose(0, 1)
        start += p
    return out


def one_gpu_packed(q, k, v, lens, padded, causal):
    """The packed sequence with the same mask on one GPU: one kernel call per document (bf16, GQA native)."""
    out = torch.zeros_like(q)
    start = 0
    for n, p in zip(lens, padded):
        qs, ks, vs = (x[start:start + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out[start:start + n] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal, enable_gqa=True)[0].transpose(0, 1)
        start += p
    return out


class _Varlen(torch.autograd.Function):
    """The whole packed sequence in one varlen flash call (forward and backward), on one GPU."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_len, causal):
        scale = q.shape[-1] ** -0.5
        out, lse, aux = varlen.flash_varlen_ops().forward(q, k, v, cu_q, cu_k, max_len, max_len, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.meta = (max_len, causal, scale, aux)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_len, causal, scale, aux = ctx.meta
        dq, dk, dv = varlen.flash_varlen_ops().backward(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_len,
                                                        max_len, causal, scale, aux)
        return dq, dk, dv, None, None, None, None


def one_gpu_varlen(q, k, v, lens, padded, causal):
    """The packed sequence with the same mask on one GPU as ONE varlen flash call (real tokens only; padded
    rows 0): the fastest one-GPU form measured here, the baseline of the target."""
    starts = [sum(padded[:i]) for i in range(len(lens))]
    idx = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]).to(q.device)
    cu = cumsum(lens, q.device)
    o = _Varlen.apply(q[idx], k[idx], v[idx], cu, cu, max(lens), causal)
    return torch.zeros_like(q).index_copy(0, idx, o)


def grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def fwd_bwd(fn, q, k, v, do):
    """One forward+backward of ``fn`` (the inputs' grads cleared first), as a step to time."""
    def step():
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v).backward(do)
    return step


def time_ms(fn, q, k, v, do, warmup, iters):
    t = torch.tensor([time_fn(fwd_bwd(fn, q, k, v, do), q.device, warmup, iters)], device=q.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def fresh_mixes(a, S: int, n: int, r: int, q, k, v, do, tok: int, dev, cuda: bool, variants=None,
                transport: str | None = None) -> dict:
    """Per variant (default: the default options and each --big-rows value; or ``variants``, (name, options)
    pairs): wall ms per fwd+bwd call (host included, synchronised, the ranks started together), over ``a.fresh``
    calls that each get a new document mix, variants interleaved per mix; medians over all calls, the second
    half and each quarter (the first shows the warm-up), max over ranks."""
    import time

    if variants is None:
        variants = [("default", None)] + option_variants(a)
    per: dict[str, list[float]] = {name: [] for name, _ in variants}
    for i in range(a.fresh):
        lens, padded = doc_lengths(S, a.doc_mean, n, seed=tok + 1000 + i)
        cu_pad, cu = cumsum(padded, dev), cumsum(lens, dev)
        idx = partition_index(cu_pad, n, r).to(dev)
        for name, opts in variants:
            ql, kl, vl = (x[idx].detach().requires_grad_(True) for x in (q, k, v))
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            out = tasp_attention(ql, kl, vl, dist.group.WORLD, causal=True, cu_seqlens_padded=cu_pad,
                                 cu_seqlens=cu, options=opts, transport=transport)
            out.backward(do[idx])
            if cuda:
                torch.cuda.synchronize()
            per[name].append((time.perf_counter() - t0) * 1e3)
    res = {}
    quarter = max(1, a.fresh // 4)
    for name, ms in per.items():
        quarters = [statistics.median(ms[s:s + quarter]) for s in range(0, len(ms) - quarter + 1, quarter)]
        t = torch.tensor([statistics.median(ms), statistics.mean(ms), statistics.median(ms[len(ms) // 2:]),
                          *quarters], device=dev, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        res[name] = {"median_ms": float(t[0]), "mean_ms": float(t[1]), "median_second_half_ms": float(t[2]),
                     "median_ms_by_quarter": [float(x) for x in t[3:]], "calls": len(ms)}
    return res


def option_variants(a) -> list[tuple[str, object]]:
    """(suffix, options) of every --big-rows and --packed-kernels value: each an options value of its own, so a
    compiled call of its own."""
    out = [(f"big_rows_{br}", default_options().replace(packed_dense_rows=br)) for br in a.big_rows.split(",") if br]
    out += [(f"packed_kernel_{pk}", default_options().replace(packed_kernel=pk))
            for pk in a.packed_kernels.split(",") if pk]
    return out


def parse_tokens(text: str) -> list[int]:
    return [int(t.lower().replace("k", "")) * (1024 if "k" in t.lower() else 1) for t in text.split(",")]


def profile(fn, q, k, v, do, rank) -> None:
    """Top CUDA kernels of one forward+backward (after two warm-up calls), printed on rank 0."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for _ in range(2):
        fn(q, k, v).backward(do)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn(q, k, v).backward(do)
        torch.cuda.synchronize()
    if rank == 0:
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16k,32k,64k,128k", help="packed tokens per sequence (comma list; 'k' = 1024)")
    ap.add_argument("--doc-mean", type=int, default=4096, help="mean document length of the log-normal mix")
    ap.add_argument("--heads", default="32/8", help="query/KV heads")
    ap.add_argument("--check-tokens", type=int, default=8192, help="sequence length of the correctness check")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--big-rows", default="", help="also time TASP packed with these options.packed_dense_rows "
                    "values: documents of at least that many rows on the dense kernel (comma list; 'none' = every "
                    "segment in the varlen launch)")
    ap.add_argument("--packed-kernels", default="", help="also time TASP packed with these options.packed_kernel "
                    "values (comma list of auto, cudnn, flash), at CP and on one GPU")
    ap.add_argument("--profile", default="", help="profile one TASP packed fwd+bwd at this size (e.g. 64k) and "
                    "print the top CUDA kernels (rank 0)")
    ap.add_argument("--fresh", type=int, default=0, help="also time N calls per size that each get a NEW document "
                    "mix (as training does), host time included, for the default and each --big-rows value "
                    "(interleaved per mix): the cost of per-shape kernel plans")
    ap.add_argument("--check-packed-kernel", default="", choices=("", "auto", "cudnn", "flash"),
                    help="run the correctness checks with this options.packed_kernel (default: auto)")
    ap.add_argument("--check-dense-rows", type=int, default=0, help="run the correctness checks with "
                    "options.packed_dense_rows=N (large causal documents on the dense kernel, bucket-padded)")
    ap.add_argument("--gloo-one-gpu", action="store_true", help="every rank on GPU 0 over a gloo group (its "
                    "all-to-all stages CUDA tensors through the host): the correctness checks with real kernels and "
                    "real exchanged data on one GPU, no timings")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda and not a.gloo_one_gpu else "gloo")
    n, r = dist.get_world_size(), dist.get_rank()
    local = 0 if a.gloo_one_gpu else int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dtype = torch.bfloat16 if cuda else torch.float32
    _count_varlen()
    hq, hkv = (int(x) for x in a.heads.split("/"))
    d = 128 if cuda else 16
    scale = 1 if cuda else 64
    results = {"cp": n, "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
               "dtype": str(dtype), "heads": a.heads, "head_dim": d, "checks": [], "timings": []}
    for causal in (True, False):  # correctness
        S = a.check_tokens // scale
        lens, padded = doc_lengths(S, max(8, a.doc_mean // scale // 4), n, seed=7 + causal)
        g = torch.Generator(device=dev).manual_seed(11)
        q, k, v, do = (torch.randn(S, h, d, device=dev, dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq))
        cu_pad, cu = cumsum(padded, dev), cumsum(lens, dev)
        cu_real = torch.tensor([0, *[sum(padded[:i]) + lens[i] for i in range(len(lens))]], device=dev)
        mask = torch.zeros(S, dtype=torch.bool, device=dev)
        for i in range(len(lens)):
            mask[int(cu_pad[i]):int(cu_real[i + 1])] = True
        do = do * mask[:, None, None]
        ref = grads(lambda x, y, z, m=(lens, padded, causal): reference(x, y, z, *m), q, k, v, do.float())
        idx = partition_index(cu_pad, n, r).to(dev)
        # the one-GPU loop runs before AND after TASP: a kernel's cached plans must not leak between them
        one_before = grads(lambda x, y, z, m=(lens, padded, causal): one_gpu_packed(x, y, z, *m), q, k, v, do)
        opts = None
        if a.check_dense_rows or a.check_packed_kernel:
            opts = default_options().replace(packed_dense_rows=a.check_dense_rows or None,
                                             packed_kernel=a.check_packed_kernel or "auto")
        got = grads(lambda x, y, z, c=causal, cp=cu_pad, cu=cu, o=opts: tasp_attention(
            x, y, z, dist.group.WORLD, causal=c, cu_seqlens_padded=cp, cu_seqlens=cu, options=o), q[idx], k[idx],
            v[idx], do[idx])
        one = grads(lambda x, y, z, m=(lens, padded, causal): one_gpu_packed(x, y, z, *m), q, k, v, do)
        rec = {"causal": causal, "tokens": S, "docs": len(lens), "varlen_launches": LAUNCHES["varlen_forward"],
               "packed_dense_rows": a.check_dense_rows or None, "packed_kernel": a.check_packed_kernel or "auto"}
        if cuda:
            vl = grads(lambda x, y, z, m=(lens, padded, causal): one_gpu_varlen(x, y, z, *m), q, k, v, do)
            for j, name in enumerate(("out", "dq", "dk", "dv")):
                rec[f"one_gpu_varlen_err_{name}"] = rel(vl[j], ref[j])
        for j, name in enumerate(("out", "dq", "dk", "dv")):
            e = torch.tensor([rel(got[j], ref[j][idx])], device=dev)
            dist.all_reduce(e, op=dist.ReduceOp.MAX)
            rec[f"err_{name}"] = float(e)
            rec[f"one_gpu_err_{name}"] = rel(one[j], ref[j])
        # not bitwise: the kernels' backward accumulates with atomics (a leaked plan gave errors of ~1.5)
        rec["one_gpu_before_after_err"] = max(rel(a_, b_) for a_, b_ in zip(one_before, one))
        rec["one_gpu_before_equals_after"] = rec["one_gpu_before_after_err"] <= 1e-2
        pad_rows = ~mask[idx]
        rec["padded_rows_zero"] = (not bool(pad_rows.any())) or all(float(t[pad_rows].abs().max()) == 0 for t in got)
        rec["ok"] = all(rec[f"err_{m}"] <= 2 * rec[f"one_gpu_err_{m}"] + 2e-2 for m in ("out", "dq", "dk", "dv")) \
            and rec["padded_rows_zero"] and rec["one_gpu_before_equals_after"]
        results["checks"].append(rec)
        if r == 0:
            print(json.dumps(rec), flush=True)
    for tok in [] if a.gloo_one_gpu else parse_tokens(a.tokens):
        S = tok // scale
        lens, padded = doc_lengths(S, max(8, a.doc_mean // scale), n, seed=tok)
        g = torch.Generator(device=dev).manual_seed(5)
        q, k, v, do = (torch.randn(S, h, d, device=dev, dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq))
        cu_pad, cu = cumsum(padded, dev), cumsum(lens, dev)
        idx = partition_index(cu_pad, n, r).to(dev)
        zig = torch.cat([torch.arange(r * S // (2 * n), (r + 1) * S // (2 * n)),
                         torch.arange((2 * n - 1 - r) * S // (2 * n), (2 * n - r) * S // (2 * n))]).to(dev)
        ql, kl, vl, dol = (x[idx].detach().requires_grad_(True) for x in (q, k, v, do))
        rec = {"tokens": S, "tokens_per_gpu": S // n, "docs": len(lens), "doc_lengths": lens,
               "masked_area_fraction": sum(x * x for x in lens) / (S * S)}
        rec["tasp_packed_ms"] = time_ms(lambda x, y, z, cp=cu_pad, cu=cu: tasp_attention(
            x, y, z, dist.group.WORLD, causal=True, cu_seqlens_padded=cp, cu_seqlens=cu), ql, kl, vl,
            dol.detach(), a.warmup, a.iters)
        qs, ks, vs = (x.detach()[zig].unsqueeze(1).requires_grad_(True) for x in (q, k, v))
        for suffix, opts in option_variants(a):
            rec[f"tasp_packed_ms_{suffix}"] = time_ms(lambda x, y, z, cp=cu_pad, cu=cu, o=opts: tasp_attention(
                x, y, z, dist.group.WORLD, causal=True, cu_seqlens_padded=cp, cu_seqlens=cu, options=o), ql, kl, vl,
                dol.detach(), a.warmup, a.iters)
        if a.profile and tok == parse_tokens(a.profile)[0]:
            profile(lambda x, y, z, cp=cu_pad, cu=cu: tasp_attention(
                x, y, z, dist.group.WORLD, causal=True, cu_seqlens_padded=cp, cu_seqlens=cu), ql, kl, vl,
                dol.detach(), r)
        rec["one_gpu_tasp_ms"] = time_ms(lambda x, y, z, cp=cu_pad, cu=cu: tasp_attention(
            x, y, z, None, causal=True, cu_seqlens_padded=cp, cu_seqlens=cu), *(t.detach().requires_grad_(True)
            for t in (q, k, v)), do, a.warmup, a.iters)
        rec["dense_causal_ms"] = time_ms(lambda x, y, z: tasp_attention(x, y, z, dist.group.WORLD, causal=True),
                                         qs, ks, vs, do[zig].unsqueeze(1), a.warmup, a.iters)
        qf, kf, vf = (x.detach().requires_grad_(True) for x in (q, k, v))
        rec["one_gpu_packed_ms"] = time_ms(lambda x, y, z, m=(lens, padded): one_gpu_packed(x, y, z, *m, True),
                                           qf, kf, vf, do, a.warmup, a.iters)
        if cuda:
            rec["one_gpu_varlen_ms"] = time_ms(lambda x, y, z, m=(lens, padded): one_gpu_varlen(x, y, z, *m, True),
                                               qf, kf, vf, do, a.warmup, a.iters)
        best = min(rec["one_gpu_packed_ms"], rec["one_gpu_tasp_ms"], rec.get("one_gpu_varlen_ms", float("inf")))
        rec["tasp_over_one_gpu"] = rec["tasp_packed_ms"] / best  # against the fastest default-settings one-GPU form
        for suffix, opts in option_variants(a):  # the same options on one GPU too, then the best
            rec[f"one_gpu_tasp_ms_{suffix}"] = time_ms(lambda x, y, z, cp=cu_pad, cu=cu, o=opts: tasp_attention(
                x, y, z, None, causal=True, cu_seqlens_padded=cp, cu_seqlens=cu, options=o),
                *(t.detach().requires_grad_(True) for t in (q, k, v)), do, a.warmup, a.iters)
            rec[f"tasp_over_one_gpu_{suffix}"] = rec[f"tasp_packed_ms_{suffix}"] / min(
                best, rec[f"one_gpu_tasp_ms_{suffix}"])
        # every one-GPU form measured, thresholds included: the fastest way this machine has to run it alone
        every = [v for key, v in rec.items() if key.startswith("one_gpu_") and "_ms" in key and "err" not in key]
        rec["tasp_over_best_one_gpu"] = rec["tasp_packed_ms"] / min(every)
        rec["tasp_over_dense_causal"] = rec["tasp_packed_ms"] / rec["dense_causal_ms"]
        if a.fresh:
            rec["fresh_mixes"] = fresh_mixes(a, S, n, r, q, k, v, do, tok, dev, cuda)
        results["timings"].append(rec)
        if r == 0:
            print(json.dumps({k_: v_ for k_, v_ in rec.items() if k_ != "doc_lengths"}), flush=True)
    results["all_ok"] = all(c["ok"] for c in results["checks"])
    if r == 0:
        print("ALL_OK" if results["all_ok"] else "FAILED", flush=True)
        if a.out:
            with open(a.out, "w") as fh:
                json.dump(results, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
