"""Can a small kernel on another stream run WHILE cuDNN's packed attention kernel runs, or only after it?

On one GPU: the whole packed sequence's fwd (and bwd) on the current stream, and, queued on a second stream
once that kernel is running, a probe kernel. A probe that ends long before the attention kernel did shared the
SMs with it; one that ends just after it waited for the attention kernel's SMs. Probes: a one-thread spin
(``torch.cuda._sleep``), an NCCL-like copy by a few thread blocks (Triton; NCCL's send/receive is a kernel of a
few blocks), and a device copy of the same size (a copy over every SM). Also the other order: the few-block copy
queued first, then the attention kernel: does the attention kernel start beside it?

    python scripts/gpu_sm_residency.py --tokens 32k --out sm.json

What it tells: whether NCCL's kernel for CP's KV exchange can run beside the own block's attention kernel on the
GPU that runs both, or waits for its last wave (docs/PERFORMANCE.md, packed item 18).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_thd import cumsum, doc_lengths, parse_tokens  # noqa: E402

from megatron_tasp import tasp_attention  # noqa: E402
from megatron_tasp.apps.bench.timing import time_fn  # noqa: E402


def _few_block_copy(blocks: int):
    """A copy kernel of ``blocks`` thread blocks, each looping over its share (NCCL's shape: few blocks, long)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr, PROGRAMS: tl.constexpr):
        pid = tl.program_id(0)
        for start in range(pid * BLOCK, n, PROGRAMS * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)

    def run(src: torch.Tensor, dst: torch.Tensor) -> None:
        _copy[(blocks,)](src, dst, src.numel(), BLOCK=4096, PROGRAMS=blocks)

    return run


def _time_beside(main, probe, side: torch.cuda.Stream, delay_s: float, trials: int, probe_first: bool,
                 prepare=None) -> dict:
    """Median over ``trials`` of: the main work's span, and when the probe ended (or, probe first, when the main
    work started and ended), in ms from the main work's start (probe first: from the probe's start).
    ``prepare`` runs before each trial (the forward whose backward is ``main``)."""
    rows = []
    for _ in range(trials):
        if prepare is not None:
            prepare()
        torch.cuda.synchronize()
        ev = {name: torch.cuda.Event(enable_timing=True) for name in ("a0", "a1", "b0", "b1")}
        if probe_first:
            with torch.cuda.stream(side):
                ev["b0"].record(side)
                probe()
                ev["b1"].record(side)
            time.sleep(delay_s)
            ev["a0"].record()
            main()
            ev["a1"].record()
        else:
            ev["a0"].record()
            main()
            ev["a1"].record()
            time.sleep(delay_s)  # the host queues the probe while the attention kernel runs
            with torch.cuda.stream(side):
                ev["b0"].record(side)
                probe()
                ev["b1"].record(side)
        torch.cuda.synchronize()
        t0 = ev["b0"] if probe_first else ev["a0"]
        rows.append({k: t0.elapsed_time(e) for k, e in ev.items() if e is not t0})
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="32k", help="packed tokens ('k' = 1024)")
    ap.add_argument("--heads", default="32/8", help="query/KV heads")
    ap.add_argument("--blocks", default="8,32", help="thread blocks of the few-block copy (comma list)")
    ap.add_argument("--copy-mib", type=float, default=64.0, help="bytes each copy probe moves")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    tok = parse_tokens(a.tokens)[0]
    hq, hkv = (int(x) for x in a.heads.split("/"))
    lens, padded = doc_lengths(tok, 4096, 1, seed=tok)
    cu_pad, cu = cumsum(padded, dev), cumsum(lens, dev)
    bounds = (tuple(cu_pad.tolist()), tuple(cu.tolist()))
    g = torch.Generator(device=dev).manual_seed(5)
    q, k, v, do = (torch.randn(tok, h, 128, device=dev, dtype=torch.bfloat16, generator=g)
                   for h in (hq, hkv, hkv, hq))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    held = {}

    def fwd() -> None:
        held["out"] = tasp_attention(q, k, v, None, causal=True, cu_seqlens_padded=bounds[0], cu_seqlens=bounds[1])

    def bwd() -> None:
        held["out"].backward(do)

    n = int(a.copy_mib * 2**20 / 4)
    src, dst = torch.randn(n, device=dev), torch.empty(n, device=dev)
    probes = {"spin_1_thread": lambda: torch.cuda._sleep(100_000), "device_copy": lambda: dst.copy_(src)}
    for b in (int(x) for x in a.blocks.split(",") if x):
        copy = _few_block_copy(b)
        probes[f"copy_{b}_blocks"] = lambda c=copy: c(src, dst)
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "tokens": tok, "docs": len(lens),
           "heads": a.heads, "copy_mib": a.copy_mib, "probe_alone_ms": {}, "beside_forward": {},
           "beside_backward": {}, "probe_first": {}}
    fwd()
    bwd()
    res["forward_alone_ms"] = round(time_fn(fwd, dev, 1, a.trials), 3)
    res["fwd_bwd_alone_ms"] = round(time_fn(lambda: (fwd(), bwd()), dev, 1, a.trials), 3)
    side = torch.cuda.Stream(device=dev)
    for name, probe in probes.items():
        res["probe_alone_ms"][name] = round(time_fn(probe, dev, 1, a.trials), 3)
        res["beside_forward"][name] = _time_beside(fwd, probe, side, 3e-4, a.trials, False)
        # 1 ms in: past the backward's dO.O, inside its main kernel
        res["beside_backward"][name] = _time_beside(bwd, probe, side, 1e-3, a.trials, False, prepare=fwd)
        if name.startswith("copy_"):
            res["probe_first"][name] = _time_beside(fwd, probe, side, 0.0, a.trials, True)
    print(json.dumps(res, indent=1), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
