"""Host time to build a packed-documents layout (``engine.thd.thd_layout``) for a NEW set of document boundaries,
which training pays once per micro-batch: two gloo processes on the CPU (CP=2), one thread each.

The varlen ops are replaced by a stand-in (CUDA-only in the engine), so the measured work is the host's: segment
ids, the blocks' row sets, the in-place segments (with ``--pair cudnn``, the default on Hopper, also the spans
and the evened ones) and the cross-rank agreement; nothing is computed, and the index tensors stay on the CPU
(on a GPU they are also copied to the device, not measured here). Prints the median
over ``--mixes`` fresh document mixes per size (the first two left out; per mix the slower rank) and writes JSON
with ``--out``.
Run it under another source tree with ``PYTHONPATH=<tree>`` to compare two versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_thd import cumsum, doc_lengths, parse_tokens  # noqa: E402

from megatron_tasp import attention  # noqa: E402
from megatron_tasp.engine import thd as engine_thd  # noqa: E402
from megatron_tasp.kernels.varlen import VarlenOps  # noqa: E402


def _worker(rank: int, world: int, a: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # built into the blocks, never called here: cuDNN's pair takes spans and asks for even ones, flash's neither
    cudnn = a.pair == "cudnn"
    stand_in = VarlenOps(None, None, None, spans=(lambda q: True) if cudnn else None, even_spans=cudnn)
    engine_thd._varlen_ops = lambda kernel, device, *_: stand_in
    cpu = torch.device("cpu")
    rows = []
    for tok in parse_tokens(a.tokens):
        local = tok // world
        q, k = torch.zeros(local, 1, 4, 8), torch.zeros(local, 1, 1, 8)
        call = attention._call(q, k, k, dist.group.WORLD, True, None, None, None, None, None, None, None, None)
        times, docs, seen = [], [], set()
        for seed in range(50 * a.mixes):
            if len(times) == a.mixes:
                break
            lens, padded = doc_lengths(tok, a.doc_mean, world, seed=tok + 7919 * seed)
            if (tuple(lens), tuple(padded)) in seen:  # a layout built before is cached: only new mixes count
                continue
            seen.add((tuple(lens), tuple(padded)))
            docs.append(len(lens))
            dist.barrier()
            t0 = time.perf_counter()
            engine_thd.thd_layout(call, cumsum(padded, cpu), cumsum(lens, cpu), local, cpu, "document")
            times.append((time.perf_counter() - t0) * 1e3)
        # per mix the slower rank (the ranks build different blocks and meet in the agreement all-reduce)
        every = [torch.zeros(len(times), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(every, torch.tensor(times, dtype=torch.float64))
        slowest = torch.stack(every).amax(0).tolist()
        rows.append({"tokens": tok, "docs_median": statistics.median(docs[2:]),
                     "layout_ms_median": statistics.median(slowest[2:]), "layout_ms": slowest})
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="32k,64k,128k", help="packed tokens per sequence (comma list; 'k' = 1024)")
    ap.add_argument("--doc-mean", type=int, default=4096, help="mean document length of the log-normal mix")
    ap.add_argument("--mixes", type=int, default=12, help="fresh document mixes per size")
    ap.add_argument("--pair", choices=("cudnn", "flash"), default="cudnn", help="the varlen pair the blocks are "
                    "built for: cuDNN's (spans, evened; the default on Hopper) or FlashAttention-2's (cu_seqlens)")
    ap.add_argument("--port", type=int, default=29541)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.mixes < 3:
        ap.error("--mixes must be at least 3 (the first two are left out of the median)")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(2, a, a.port, results), nprocs=2, start_method="spawn", join=False)
    rows = None
    try:
        while not procs.join(timeout=1):
            if rows is None and not results.empty():
                rows = results.get()
    except ProcessException as exc:  # a worker failing while it exits must not lose the measurements
        print(f"warning: a worker failed: {exc}", file=sys.stderr)
    if rows is None and not results.empty():
        rows = results.get()
    if rows is None:
        raise SystemExit("the workers ended without measurements")
    for row in rows:
        print(f"{row['tokens']:>7} tokens, ~{row['docs_median']:.0f} documents: {row['layout_ms_median']:.2f} ms "
              "per new layout (median)")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"cp": 2, "doc_mean": a.doc_mean, "pair": a.pair, "torch": torch.__version__, "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
