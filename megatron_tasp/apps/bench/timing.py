"""Timing helpers of ``megatron-tasp bench``: CUDA-event medians, round-robin rounds, max over ranks."""

from __future__ import annotations

import datetime
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["busy_time", "environment", "max_over_ranks", "one_call_ms", "sync", "time_back_to_back", "time_fn",
           "time_round_robin"]


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: how long some kernel ran, on any stream (profile
    summaries compare it with the span from the first start to the last end)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def sync(device) -> None:
    """Wait for the device (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_over_ranks(x: float, device, group=None) -> float:
    """The maximum of ``x`` over the ranks of ``group`` (collective; on the CPU for a gloo group)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def time_fn(fn: Callable[[], Any], device, warmup: int, iters: int, min_total_ms: float = 0.0,
            agree: Callable[[float], float] | None = None) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU) after ``warmup`` calls.

    With ``min_total_ms`` the repetitions grow (up to 20x ``iters``) until they cover that much time, so
    sub-millisecond shapes get enough samples; ``agree`` (e.g. max over ranks) makes every rank run the
    same count, which collectives inside ``fn`` require.
    """
    for _ in range(warmup):
        fn()
    return time_round_robin([fn], device, iters, 1, min_total_ms, agree=agree)[0]


def one_call_ms(fn: Callable[[], Any], device) -> float:
    """Milliseconds of one call of ``fn``: between CUDA events with a synchronisation after it (perf_counter on
    CPU)."""
    import torch

    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_back_to_back(fn: Callable[[], Any], device, warmup: int, iters: int, rounds: int = 3) -> float:
    """Milliseconds per call of ``fn`` in steady state: ``iters`` calls queued back to back between two CUDA events
    (one synchronisation per round, perf_counter on CPU), the median over ``rounds`` rounds. Unlike
    :func:`time_fn`, whose every sample starts from an idle device, host work that a call overlaps with the
    device work of the call before it is hidden here, as it is between the layers of a model."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(max(1, rounds)):
        sync(device)
        if device.type == "cuda":
            import torch

            with torch.cuda.device(device):  # events on the timed device's current stream
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(iters):
                    fn()
                b.record()
                b.synchronize()
            per_call.append(a.elapsed_time(b) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per_call.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(per_call)


def time_round_robin(fns: list[Callable[[], Any]], device, iters: int, rounds: int = 1, min_total_ms: float = 0.0,
                     agree: Callable[[float], float] | None = None,
                     reduce: Callable[[float], float] | None = None) -> list[float]:
    """Median milliseconds of each of ``fns`` (warmed up by the caller), timed in ``rounds`` rounds that take
    turns (round 1 of every fn, then round 2, ...), so that slow drifts of the machine (clocks, other
    tenants of the host) fall on every variant alike instead of on whichever ran during them. Each sample
    is one call between CUDA events with a synchronisation after it (perf_counter on CPU), ``reduce``d
    (e.g. max over ranks) per sample. ``min_total_ms`` grows the repetitions as in :func:`time_fn`."""
    counts = []
    for fn in fns:
        n_it = iters
        if min_total_ms > 0:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            one = max((time.perf_counter() - t0) * 1e3, 1e-3)
            want = float(min(20 * iters, max(iters, math.ceil(min_total_ms / one))))
            n_it = int(agree(want) if agree is not None else want)
        counts.append(n_it)
    rounds = max(1, rounds)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(counts[i] // rounds + (1 if r < counts[i] % rounds else 0)):
                ms = one_call_ms(fn, device)
                samples[i].append(reduce(ms) if reduce is not None else ms)
    return [statistics.median(s) for s in samples]


def environment(device) -> dict[str, Any]:
    """Versions and card for the records."""
    import torch

    env = {"torch": torch.__version__, "date": datetime.date.today().isoformat()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["cudnn"] = str(torch.backends.cudnn.version())
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    return env
