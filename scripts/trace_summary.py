"""Summarise a torch profiler chrome trace (``.json`` or ``.json.gz``): GPU kernel time by category per step.

    python scripts/trace_summary.py rank-0.json.gz --steps 2 [--json OUT.json]

Categories (by kernel name, first match): attention (cuDNN / flash SDPA kernels), TASP merge (the Triton
``_merge``), NCCL, GEMM (cuBLAS / CUTLASS), and everything else (the largest of those listed by name). Also
the span from the first to the last kernel, and how much of it some kernel ran (any stream). Used to split a
Megatron-LM iteration into what belongs to attention, to communication and to the rest of the model.

``--host`` adds where the host spends the step: CUDA runtime calls by name (launches, and the calls that
wait for the GPU: stream / device / event synchronisation and blocking copies), and, for a trace taken with
Python call stacks (Megatron-LM: ``--pytorch-profiler-collect-callstack``), the Python frames under which the
host waited, and the inclusive host time of the heaviest functions of Megatron and this package.
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


WAITS = re.compile(r"Synchronize|^cudaMemcpy$|^cuMemcpyDtoH|^cudaMemcpy2D$")
OURS = re.compile(r"megatron_tasp/|megatron/core/|megatron/training/")


def load_all(path: str) -> list[dict]:
    """The trace's complete-duration events."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def load(path: str) -> list[dict]:
    """The trace's complete-duration GPU kernel events."""
    return gpu_events(load_all(path))


def gpu_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def _frames(stack: list[tuple[float, str]], depth: int = 6) -> str:
    """The innermost ``depth`` frames of Megatron or this package under which an event ran."""
    ours = [name for _, name in stack if OURS.search(name)]
    return " < ".join(reversed(ours[-depth:])) or "(no Megatron frame)"


def host_summary(events: list[dict], steps: int, top: int = 15) -> dict:
    """Per-step host view: runtime calls by name, waits attributed to Python frames, heaviest functions."""
    runtime: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            r = runtime[e.get("name", "")]
            r[0] += 1
            r[1] += float(e.get("dur", 0.0)) / 1e3
    waits: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    inclusive: dict[str, float] = defaultdict(float)
    by_tid: dict[object, list[dict]] = defaultdict(list)
    for e in events:
        cat = e.get("cat")
        if cat == "python_function" or (cat in ("cuda_runtime", "cuda_driver") and WAITS.search(e.get("name", ""))):
            by_tid[e.get("tid")].append(e)
    for tid_events in by_tid.values():
        tid_events.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        stack: list[tuple[float, str]] = []
        for e in tid_events:
            ts, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
            while stack and stack[-1][0] <= ts:
                stack.pop()
            if e.get("cat") == "python_function":
                name = e.get("name", "")
                if OURS.search(name) and all(n != name for _, n in stack):  # re-entered frames count once
                    inclusive[name] += (end - ts) / 1e3
                stack.append((end, name))
            else:
                w = waits[f"{e.get('name')} @ {_frames(stack)}"]
                w[0] += 1
                w[1] += (end - ts) / 1e3

    def per_step(d: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        rows = sorted(d.items(), key=lambda kv: -kv[1][1])[:top]
        return {k: {"calls": round(v[0] / steps, 1), "ms": round(v[1] / steps, 2)} for k, v in rows}

    return {"runtime_per_step": per_step(runtime), "waits_per_step": per_step(waits),
            "heaviest_functions_ms_per_step": {k: round(v / steps, 2) for k, v in
                                               sorted(inclusive.items(), key=lambda kv: -kv[1])[:top * 2]}}


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
    p.add_argument("--host", action="store_true", help="also summarise the host side (runtime calls, waits)")
    a = p.parse_args(argv)
    events = load_all(a.trace)
    kernels = gpu_events(events)
    if not kernels:
        p.error(f"{a.trace} holds no GPU kernel events (was the profiler started with CUDA activity?)")
    s = summarise(kernels, a.steps)
    if a.host:
        s["host"] = host_summary(events, a.steps)
    print(json.dumps(s, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(s, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
