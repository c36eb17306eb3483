"""One GPU: the in-place varlen block (segments with an empty partner) against the per-document block.

    python scripts/gpu_check_varlen_in_place.py --out varlen_in_place.json

``--ops cudnn`` checks cuDNN's ragged pair (``megatron_tasp.kernels.cudnn_varlen``) the same way; it takes spans,
so its in-place blocks launch the shared segments alone (every other row left to the block).

A packed block whose shared segments ascend as runs on both sides runs as ONE FlashAttention-2 varlen call over
every row (``megatron_tasp.kernels.varlen``): rows outside the shared segments are segments whose other side is
empty (causal blocks are square own blocks, which have no gaps in the engine; only non-causal blocks get gaps
here). The block writes output 0 (lse -inf) for queries without keys and dq 0 / dk, dv 0 for rows without
partners itself, whatever the pair leaves there (cuDNN leaves the output rows unset). This checks the block with
the real pair, for random mixes of shared segments and gaps on both sides
(and every sixth block with one-row query segments, which must gather instead), GQA and MHA, causal (square
segments) and not, bf16 and fp16: forward, lse and the backward from a perturbed merged out/lse against the per-
document block on the dense kernel within fixed relative tolerances (bf16 0.02, fp16 0.004); partnerless rows
exactly 0.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from megatron_tasp.kernels import get_kernel
from megatron_tasp.kernels.cudnn_varlen import cudnn_varlen_ops
from megatron_tasp.kernels.segmented import segmented_block
from megatron_tasp.kernels.varlen import VarlenBlock, flash_varlen_ops


def _mix(rng: random.Random, causal: bool, one_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids of queries and keys: shared segments in order, gaps (-1 queries only, -2 keys only);
    ``one_row``: every query segment and gap one row (the block must then gather, see varlen._in_place)."""
    q, k = [], []
    if one_row:
        for s in range(rng.randint(2, 9)):
            q += [s] + [-1] * rng.randint(0, 1)
            k += [s] * rng.randint(1, 40) + [-2] * rng.randint(0, 3)
        return torch.tensor(q), torch.tensor(k)
    for s in range(rng.randint(1, 7)):
        if not causal and rng.random() < 0.5:
            q += [-1] * rng.randint(1, 300)
        if not causal and rng.random() < 0.5:
            k += [-2] * rng.randint(1, 300)
        n_q = rng.choice([1, 7, 64, 129, 700, 2048])
        n_k = n_q if causal else rng.choice([1, 9, 64, 257, 1500])
        q += [s] * n_q
        k += [s] * n_k
    if not causal and rng.random() < 0.5:
        q += [-1] * rng.randint(1, 200)
    if not causal and rng.random() < 0.5:
        k += [-2] * rng.randint(1, 200)
    return torch.tensor(q), torch.tensor(k)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def _probe_one_row_gqa(dev: torch.device) -> str:
    """What torch's flash varlen forward does with GQA, one-row query segments and more segments than query
    rows (the case the block gathers instead): q [6, 32, 128], k/v [6, 8, 128]."""
    from megatron_tasp.kernels.varlen import _flash_forward

    q = torch.randn(6, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(6, 8, 128, device=dev, dtype=torch.bfloat16)
    cu_q = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 0, 1, 2, 2, 4, 4, 6], dtype=torch.int32, device=dev)
    try:
        _flash_forward(q, k, k, cu_q, cu_k, 1, 2, False, 0.1)
        return "no error"
    except RuntimeError as exc:
        return f"RuntimeError: {str(exc)[:200]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--out", default="varlen_in_place.json")
    ap.add_argument("--ops", choices=("flash", "cudnn"), default="flash",
                    help="the varlen pair under test: FlashAttention-2's or cuDNN's ragged attention (needs the cuDNN "
                    "frontend package)")
    args = ap.parse_args()
    ops = cudnn_varlen_ops() if args.ops == "cudnn" else flash_varlen_ops()
    dev = torch.device("cuda")
    rng = random.Random(7)
    rows, ok = [], True
    for i in range(args.cases):
        causal = i % 2 == 0
        hkv = (8, 32)[i % 4 // 2]
        dtype = (torch.bfloat16, torch.float16)[i % 3 == 0]
        one_row = i % 6 == 5
        seg_q, seg_k = _mix(rng, causal and not one_row, one_row)
        causal = causal and not one_row
        kern = get_kernel("auto", dev, dtype, 128)
        seg = segmented_block(kern, seg_q, seg_k, dev)
        var = VarlenBlock(seg, dev, ops=ops)
        in_place = isinstance(var.q_index, slice) and isinstance(var.k_index, slice) and var.q_index == slice(
            0, len(seg_q)) and var.k_index == slice(0, len(seg_k))
        gen = torch.Generator(device=dev).manual_seed(i)
        q = torch.randn(1, 32, len(seg_q), 128, device=dev, dtype=dtype, generator=gen)
        k, v = (torch.randn(1, hkv, len(seg_k), 128, device=dev, dtype=dtype, generator=gen) for _ in range(2))
        dout = torch.randn(q.shape, device=dev, dtype=dtype, generator=gen)
        o1, l1, c1 = seg.forward_unchecked(q, k, v, causal=causal, scale=0.088)
        o2, l2, c2 = var.forward_unchecked(q, k, v, causal=causal, scale=0.088)
        fin = torch.isfinite(l1)
        lse_ok = bool(torch.equal(torch.isfinite(l2), fin)) and not bool(torch.isposinf(l2).any())
        out_m = o1 * 0.75
        lse_m = torch.where(fin, l1 + 0.2, l1)
        g1 = seg.backward_unchecked(dout, q, k, v, out_m, lse_m, c1, causal=causal, scale=0.088)
        g2 = var.backward_unchecked(dout, q, k, v, out_m, lse_m, c2, causal=causal, scale=0.088)
        errs = {"out": _rel(o2, o1), "lse": float((l2[fin] - l1[fin]).abs().max()) if bool(fin.any()) else 0.0,
                **{name: _rel(a, b) for name, a, b in zip(("dq", "dk", "dv"), g2, g1)}}
        lq, lk = (seg_q == -1).to(dev), (seg_k == -2).to(dev)
        zero_rows = bool((o2[0, :, lq] == 0).all()) and bool((g2[0][0, :, lq] == 0).all()) and \
            bool((g2[1][0, :, lk] == 0).all()) and bool((g2[2][0, :, lk] == 0).all())
        tol = 0.02 if dtype == torch.bfloat16 else 0.004  # two bf16/fp16 kernels of different tiling
        runs = torch.unique_consecutive(seg_q, return_counts=True)[1]
        expect_in_place = int(runs.max()) > 1  # one-row query segments gather (see varlen._in_place)
        # a pair that takes spans (cuDNN's) gets the shared segments alone wherever the block runs in place
        spans = bool(isinstance(c2, tuple) and len(c2) == 4 and c2[3])
        good = in_place == expect_in_place and lse_ok and zero_rows and all(e <= tol for e in errs.values()) \
            and spans == (in_place and ops.takes_spans(q[0].transpose(0, 1)))
        ok &= good
        row = {"case": i, "one_row_queries": one_row, "expect_in_place": expect_in_place, "causal": causal,
               "heads_kv": hkv, "dtype": str(dtype),
               "rows_q": len(seg_q), "rows_k": len(seg_k), "segments": int(var.cu_q.numel() - 1), "in_place": in_place,
               "spans": spans, "lse_ok": lse_ok, "partnerless_rows_zero": zero_rows, "errors": errs, "ok": good}
        rows.append(row)
        print(json.dumps(row), flush=True)
    probe = _probe_one_row_gqa(dev)
    print(f"probe: flash varlen, GQA, one-row query segments outnumbered by segments: {probe}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ops": args.ops,
                   "all_ok": ok, "rows": rows,
                   "probe_max_q_1": probe}, f, indent=1)
    print("ALL_OK" if ok else "FAILED", flush=True)


if __name__ == "__main__":
    main()
