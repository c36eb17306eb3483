"""Summarise a torch profiler chrome trace (``.json`` or ``.json.gz``): GPU kernel time by category per step.

    python scripts/trace_summary.py rank-0.json.gz --steps 2 [--json OUT.json]

Categories (by kernel name, first match): attention (cuDNN / flash SDPA kernels), TASP merge (the Triton
``_merge``), NCCL, GEMM (cuBLAS / CUTLASS), and everything else (the largest of those listed by name). Also
the span from the first to the last kernel, and how much of it some kernel ran (any stream). Used to split a
Megatron-LM iteration into what belongs to attention, to communication and to the rest of the model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict

from megatron_tasp.apps.bench.timing import busy_time

CATEGORIES = (("attention", re.compile(r"sdpa|fmha|flash|cudnn", re.I)),
              ("tasp_merge", re.compile(r"^_merge")),
              ("nccl", re.compile(r"nccl", re.I)),
              ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.I)))


def load(path: str) -> list[dict]:
    """The trace's complete-duration GPU kernel events."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def summarise(kernels: list[dict], steps: int) -> dict:
    """Per-step milliseconds by category, the top 'other' kernels, span and busy fraction."""
    by_cat: dict[str, float] = defaultdict(float)
    other: dict[str, float] = defaultdict(float)
    for e in kernels:
        name, dur = e.get("name", ""), float(e.get("dur", 0.0)) / 1e3
        cat = next((c for c, rx in CATEGORIES if rx.search(name)), "other")
        by_cat[cat] += dur
        if cat == "other":
            other[name[:80]] += dur
    iv = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in kernels]
    busy = busy_time(iv)
    span = max(e for _, e in iv) - min(s for s, _ in iv)
    return {"steps": steps, "span_ms_per_step": round(span / 1e3 / steps, 2),
            "busy_ms_per_step": round(busy / 1e3 / steps, 2),
            "kernel_ms_per_step": {k: round(v / steps, 2) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_other_ms_per_step": {k: round(v / steps, 2) for k, v in
                                      sorted(other.items(), key=lambda kv: -kv[1])[:10]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1, help="profiled steps in the trace (to report per step)")
    p.add_argument("--json", default=None, help="also write the summary here")
    a = p.parse_args(argv)
    kernels = load(a.trace)
    if not kernels:
        p.error(f"{a.trace} holds no GPU kernel events (was the profiler started with CUDA activity?)")
    s = summarise(kernels, a.steps)
    print(json.dumps(s, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(s, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
