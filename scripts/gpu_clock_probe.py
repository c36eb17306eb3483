"""Clocks and power while TASP and the plain kernels run: is the gap above ``kernel_bound`` a power effect?

    torchrun --nproc-per-node 2 scripts/gpu_clock_probe.py --tokens 32768 --seconds 4 --out probe.json

Per token count, each variant runs back to back for ``--seconds`` (one call after another, each timed between
CUDA events with a synchronisation after it, as the bench does) in the order A B C ... C B A, so that a slow
drift falls on every variant alike. Variants:

- ``tasp`` (default options), ``tasp_keep_kv`` (the forward's K/V kept for the backward), ``tasp_symm`` (the
  copy-engine transport), ``compute_only`` (the engine, nothing sent);
- ``kernel_bound``: the same block kernels called plainly;
- ``kernel_bound_traffic``: those kernels while the bytes a default TASP call sends move as plain NCCL
  send/recv pairs on a side stream, all posted at the start (the plain kernels plus the communication).
  Records before 2026-12-02 sent more: dK/dV in fp32 and K/V again at every size.

Rank 0 samples every visible GPU's SM clock, power draw and clock-event reasons (NVML through ``pynvml`` when
installed, else ``nvidia-smi -lms``) and reports per phase: median ms per call (max over ranks), mean SM clock
and power over the phase, and the share of samples with a power-cap or thermal reason set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import threading
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_tasp import tasp_attention
from megatron_tasp.apps.bench.kernel_bound import block_work, kernel_bound_fn
from megatron_tasp.apps.bench.timing import one_call_ms
from megatron_tasp.kernels import get_kernel

POWER_CAP, HW_SLOWDOWN, SW_THERMAL, HW_THERMAL, POWER_BRAKE = 0x4, 0x8, 0x20, 0x40, 0x80


class Sampler:
    """Background samples ``(unix time, gpu index, sm MHz, watts, reasons bitmask)`` of every GPU."""

    def __init__(self, period_ms: int) -> None:
        self.samples: list[tuple[float, int, float, float, int]] = []
        self.source = ""
        self.error: str | None = None
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, args=(period_ms,), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
        self._thread.join(timeout=5)

    def _run(self, period_ms: int) -> None:
        try:
            self._sample(period_ms)
        except Exception as exc:  # noqa: BLE001 - reported in the result instead of dying silently
            self.error = repr(exc)[:300]

    def _sample(self, period_ms: int) -> None:
        try:
            import pynvml
        except ImportError:
            self._run_smi(period_ms)
            return
        pynvml.nvmlInit()
        self.source = "pynvml"
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        while not self._stop.is_set():
            now = time.time()
            for i, h in enumerate(handles):
                self.samples.append((now, i, float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                                     pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
                                     int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h))))
            time.sleep(period_ms / 1e3)

    def _run_smi(self, period_ms: int) -> None:
        self.source = "nvidia-smi"
        for field in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
            cmd = ["nvidia-smi", f"--query-gpu=timestamp,index,clocks.sm,power.draw,{field}",
                   "--format=csv,noheader,nounits", f"-lms={period_ms}"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            got = False
            for line in self._proc.stdout:
                parts = [p.strip() for p in line.split(",")]
                try:
                    ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    self.samples.append((ts, int(parts[1]), float(parts[2]), float(parts[3]), int(parts[4], 16)))
                    got = True
                except (ValueError, IndexError):
                    continue
            if got or self._stop.is_set():
                return


def _summary(samples: list, t0: float, t1: float) -> dict:
    """Per GPU: mean SM clock, mean power, share of samples with a power or thermal reason, in [t0, t1]."""
    out = {}
    for gpu in sorted({s[1] for s in samples}):
        rows = [s for s in samples if s[1] == gpu and t0 <= s[0] <= t1]
        if not rows:
            continue
        out[str(gpu)] = {"samples": len(rows), "sm_mhz": round(statistics.mean(r[2] for r in rows), 1),
                         "watts": round(statistics.mean(r[3] for r in rows), 1),
                         "power_capped": round(sum(bool(r[4] & (POWER_CAP | POWER_BRAKE)) for r in rows)
                                               / len(rows), 3),
                         "thermal_or_hw": round(sum(bool(r[4] & (HW_SLOWDOWN | SW_THERMAL | HW_THERMAL))
                                                    for r in rows) / len(rows), 3)}
    return out


def _traffic(tokens: int, hkv: int, world: int, rank: int, group):
    """A wrapper running a callable while the bytes one default TASP fwd+bwd sends at CP=2 move to the peer
    concurrently as plain NCCL send/recv pairs on a side stream: the forward's K/V, the backward's K/V sent
    again when the default does not keep them (above the 64 MiB cap), and dK/dV sent home in the input dtype
    (bf16 K/V, head dim 128)."""
    from megatron_tasp.options import KEEP_KV_AUTO_MIB, keep_kv_auto

    peer = (rank + 1) % world
    kv = 2 * tokens * hkv * 128  # K and V elements
    kept = keep_kv_auto(world, kv * 2, "a2a", KEEP_KV_AUTO_MIB * 2**20)
    bufs = [torch.empty(kv, device="cuda", dtype=torch.bfloat16) for _ in range(2 if kept else 3)]
    recv = [torch.empty_like(b) for b in bufs]
    side = torch.cuda.Stream()

    def run(fn) -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ops = [op for b, r in zip(bufs, recv) for op in (dist.P2POp(dist.isend, b, peer, group),
                                                               dist.P2POp(dist.irecv, r, peer, group))]
            works = dist.batch_isend_irecv(ops)
        fn()
        for w in works:
            w.wait()
        torch.cuda.current_stream().wait_stream(side)
    return run


def _phase(fn, seconds: float, group) -> list[float]:
    """Calls of ``fn`` for about ``seconds`` (the same count on every rank), ms per call."""
    times: list[float] = []
    flag = torch.zeros(1, device="cuda")
    start = time.perf_counter()
    while True:
        times.append(one_call_ms(fn, flag.device))
        flag.fill_(float(time.perf_counter() - start >= seconds))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() > 0:
            return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="32768", help="tokens per GPU, comma-separated")
    ap.add_argument("--heads", default="32/8", help="query/KV heads")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each phase")
    ap.add_argument("--period-ms", type=int, default=20, help="sampling period")
    ap.add_argument("--out", default="clock_probe.json")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = dist.group.WORLD
    hq, hkv = (int(x) for x in args.heads.split("/"))
    sampler = Sampler(args.period_ms)
    if rank == 0:
        sampler.start()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "nccl": ".".join(
        str(x) for x in torch.cuda.nccl.version()), "heads": args.heads, "cp": world, "seconds": args.seconds,
        "date": datetime.date.today().isoformat(), "shapes": {}}
    for tokens in (int(t) for t in args.tokens.split(",")):
        q = torch.randn(tokens, 1, hq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(tokens, 1, hkv, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(tokens, 1, hkv, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)

        def step(q=q, k=k, v=v, do=do, **kw):
            torch.autograd.grad(tasp_attention(q, k, v, g, **kw), (q, k, v), do)

        kernel = get_kernel("auto", q.device, q.dtype, 128)
        bhsd = [x.detach().permute(1, 2, 0, 3) for x in (q, k, v, do)]
        bound = kernel_bound_fn(kernel, *bhsd, block_work(tokens, world, rank, True), "fwd_bwd", 128 ** -0.5)
        traffic = _traffic(tokens, hkv, world, rank, g)
        variants = {"tasp": step, "tasp_keep_kv": partial(step, keep_kv=True),
                    "tasp_symm": partial(step, transport="symm"), "compute_only": partial(step, transport="none"),
                    "kernel_bound": bound, "kernel_bound_traffic": partial(traffic, bound)}
        for name in list(variants):
            failed = None
            try:
                for _ in range(3):
                    variants[name]()
            except Exception as exc:  # noqa: BLE001 - a variant this shape cannot run is left out, named
                failed = repr(exc)[:300]
            flag = torch.tensor([float(failed is not None)], device="cuda")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=g)  # every rank drops it, or none does
            if flag.item() > 0:
                result.setdefault("skipped", {})[f"{tokens}:{name}"] = failed or "failed on another rank"
                del variants[name]
        torch.cuda.synchronize()
        phases = []
        order = list(variants) + list(reversed(variants))
        for name in order:
            t0 = time.time()
            ms = _phase(variants[name], args.seconds, g)
            t1 = time.time()
            ms_t = torch.tensor([statistics.median(ms)], device="cuda", dtype=torch.float64)
            dist.all_reduce(ms_t, op=dist.ReduceOp.MAX, group=g)
            phases.append({"variant": name, "calls": len(ms), "median_ms": round(float(ms_t.item()), 3),
                           "t0": t0, "t1": t1})
        if rank == 0:
            for p in phases:  # skip the first 10% of a phase: the clock settles
                p["gpus"] = _summary(sampler.samples, p["t0"] + 0.1 * (p["t1"] - p["t0"]), p["t1"])
                print(f"{tokens} {p['variant']:>13}: {p['median_ms']:.3f} ms  {p['gpus']}", flush=True)
            means = {v: statistics.mean(p["median_ms"] for p in phases if p["variant"] == v) for v in variants}
            result["shapes"][str(tokens)] = {"phases": phases, "mean_ms": means}
            if "kernel_bound" in means:
                result["shapes"][str(tokens)]["over_kernel_bound"] = {
                    v: round(m / means["kernel_bound"], 4) for v, m in means.items()}
        del q, k, v, do, bhsd
    if rank == 0:
        sampler.stop()
        result["sampler"] = sampler.source
        result["sampler_error"] = sampler.error
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
