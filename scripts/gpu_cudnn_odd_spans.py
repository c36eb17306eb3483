"""cuDNN's ragged attention (the packed-document pair) on one GPU: does its backward pay for query segments of
odd row counts, or for gaps between spans?

    python scripts/gpu_cudnn_odd_spans.py --out odd_spans.json

One causal block shaped like a CP=2 rank's own block of packed documents (two chunks of each document back to
back; the default chunk sizes and padding are those of the 32K mix of ``gpu_thd_rank_probe.py`` at rank 0),
launched five ways: back-to-back segments of even lengths; spans with the padded rows left out (odd lengths,
gaps); the same odd lengths back to back; even lengths with gaps; even spans without gaps. Each: forward and
backward time (back to back, median of rounds) and the backward's CUDA kernels (profiler, per call). The
``VarlenOps.even_spans`` request of cuDNN's pair rests on this measurement; rerun it on a new cuDNN release.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_tasp.apps.bench.timing import time_back_to_back
from megatron_tasp.kernels.cudnn_varlen import cudnn_varlen_ops


def _bounds(starts: list[int], lengths: list[int], back_to_back: bool, dev: torch.device) -> torch.Tensor:
    if back_to_back:
        cu = [0]
        for x in lengths:
            cu.append(cu[-1] + x)
        return torch.tensor(cu, dtype=torch.int32, device=dev)
    return torch.tensor([[s, s + x] for s, x in zip(starts, lengths)], dtype=torch.int32, device=dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", default="2048,1024,359,872,2024,1865", help="chunk rows per document")
    ap.add_argument("--pads", default="0,0,2,3,1,0", help="padded rows at the end of each document")
    ap.add_argument("--heads", default="32/8", help="query/KV heads")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda", 0)
    cs = [int(x) for x in a.chunks.split(",")]
    pads = [int(x) for x in a.pads.split(",")]
    hq, hkv = (int(x) for x in a.heads.split("/"))
    d, rows = 128, 2 * sum(cs)
    g = torch.Generator(device=dev).manual_seed(0)
    q, do = (torch.randn(rows, hq, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = (torch.randn(rows, hkv, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    starts = [2 * sum(cs[:i]) for i in range(len(cs))]
    even = [2 * c for c in cs]
    real = [2 * c - p for c, p in zip(cs, pads)]
    even_gaps = [2 * c - 2 if p else 2 * c for c, p in zip(cs, pads)]
    variants = {"even_back_to_back": (even, True), "odd_spans_with_gaps": (real, False),
                "odd_back_to_back": (real, True), "even_spans_with_gaps": (even_gaps, False),
                "even_spans_no_gaps": (even, False)}
    ops, scale = cudnn_varlen_ops(), d ** -0.5
    res: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                 "cudnn": torch.backends.cudnn.version(), "chunks": cs, "pads": pads, "heads": a.heads,
                 "variants": {}}
    for name, (lengths, b2b) in variants.items():
        b = _bounds(starts, lengths, b2b, dev)
        mx = max(lengths)
        out, lse, aux = ops.forward(q, k, v, b, b, mx, mx, True, scale)

        def fwd(b=b, mx=mx):
            return ops.forward(q, k, v, b, b, mx, mx, True, scale)

        def bwd(b=b, mx=mx, out=out, lse=lse, aux=aux):
            return ops.backward(do, q, k, v, out, lse, b, b, mx, mx, True, scale, aux)

        row = {"odd_segments": sum(x % 2 for x in lengths), "rows": sum(lengths),
               "fwd_ms": statistics.median(time_back_to_back(fwd, dev, 3, a.iters) for _ in range(2)),
               "bwd_ms": statistics.median(time_back_to_back(bwd, dev, 3, a.iters) for _ in range(2))}
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                bwd()
            torch.cuda.synchronize()
        row["bwd_kernels_us"] = {e.key[:60]: round(e.device_time_total / 5, 1) for e in p.key_averages()
                                 if e.device_time_total > 0}
        res["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
