"""Fit a :class:`Calibration` to the benchmark records of one machine (offline: ``megatron-tasp simulate``).

Steps: transport sweep -> alpha, bw_max, t_msg (weighted least squares); single-GPU records -> kernel rate
curves (least squares); compute_only records -> memory bandwidth and host times (Nelder-Mead on the squared
log error); tasp records -> per-exchange host time and interference (Nelder-Mead, restarted until it stops
improving, from the fixed :data:`FIT_START`). Record kinds that are missing keep the shipped defaults. Pure
Python (the systems are tiny); never imported on the engine's path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from megatron_tasp.costmodel.model import TRANSPORTS, Prediction, predict
from megatron_tasp.costmodel.params import Calibration, CostModelError, KernelRate, Shape, default_calibration
from megatron_tasp.costmodel.records import BenchRecord, load_records
from megatron_tasp.topology import Topology, generic_topology, load_topology

__all__ = ["CP2_TOPOLOGY_BY_DEVICE", "DEFAULT_CP2_TOPOLOGY", "FIT_START", "MEM_CAP_GBPS", "calibrate",
           "cp2_topology_for", "load_calibration", "modelled", "nelder_mead", "predict_record", "record_shape",
           "summarize"]

#: Upper bound for the fitted bandwidth of memory-bound work: 90 % of an H100's 3.35 TB/s HBM. The memory
#: terms are small next to the kernels, so an unbounded fit can drift past what the hardware can do.
MEM_CAP_GBPS = 3000.0

#: Where the Nelder-Mead fits (compute_only, tasp) start: fixed values (those of the 2x H100 v4 fit), not the
#: shipped default calibration, so that the fit of a record set does not change with the default that ships.
FIT_START: dict[str, float] = {"mem_GBps": 1554.0, "host_fwd_ms": 0.8836, "host_bwd_ms": 1.223,
                               "host_prefix_ms": 2.229e-09, "host_exchange_a2a_ms": 0.0611,
                               "host_exchange_p2p_ms": 0.3349, "interference": 1.0}


def _as_records(records: Sequence[BenchRecord | Mapping[str, Any]]) -> list[BenchRecord]:
    return [r if isinstance(r, BenchRecord) else BenchRecord.from_dict(r) for r in records]


def record_shape(rec: BenchRecord) -> Shape:
    """The cost-model shape of an attention record."""
    return Shape(tokens_per_gpu=rec.tokens_per_gpu, batch=rec.batch, heads_q=rec.heads_q, heads_kv=rec.heads_kv,
                 head_dim=rec.head_dim, causal=rec.causal, passes=rec.passes, dtype_bytes=rec.dtype_bytes,
                 dkv_bytes=rec.dkv_bytes)


def modelled(rec: BenchRecord) -> bool:
    """A usable timing the model describes. Left out of calibration and error reports: the copy-engine
    ``symm`` transport, runs with more than one chunk, and the first run's backward (``dkv_own_travels``)."""
    return (rec.timed and (rec.transport or "a2a") in TRANSPORTS and rec.chunks == 1
            and not rec.dkv_own_travels)


def _attention(records: Sequence[BenchRecord], impl: str) -> list[BenchRecord]:
    return [r for r in records if r.kind == "attention" and r.impl == impl and modelled(r)]


def summarize(errs: Sequence[float]) -> dict[str, float]:
    """Count, median / mean / rms / max absolute and mean signed relative error."""
    if not errs:
        return {"records": 0}
    a = sorted(abs(e) for e in errs)
    mid = len(a) // 2
    median = a[mid] if len(a) % 2 else 0.5 * (a[mid - 1] + a[mid])
    return {"records": len(errs), "mean_abs_rel_err": sum(a) / len(a), "median_abs_rel_err": median,
            "rms_rel_err": math.sqrt(sum(e * e for e in errs) / len(errs)), "max_abs_rel_err": a[-1],
            "mean_signed_rel_err": sum(errs) / len(errs)}


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a small dense linear system (Gaussian elimination with partial pivoting)."""
    m = len(b)
    aug = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(m):
        p = max(range(c, m), key=lambda r: abs(aug[r][c]))
        if abs(aug[p][c]) < 1e-300:
            raise CostModelError("degenerate fit: the records do not determine the parameters")
        aug[c], aug[p] = aug[p], aug[c]
        for r in range(m):
            if r != c:
                f = aug[r][c] / aug[c][c]
                aug[r] = [x - f * y for x, y in zip(aug[r], aug[c])]
    return [aug[i][m] / aug[i][i] for i in range(m)]


def _weighted_lsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares in relative error: minimise sum ((x.row - y) / y)^2."""
    m = len(rows[0])
    ata = [[0.0] * m for _ in range(m)]
    aty = [0.0] * m
    for row, yi in zip(rows, y):
        w = 1.0 / (yi * yi)
        for i in range(m):
            aty[i] += w * row[i] * yi
            for j in range(m):
                ata[i][j] += w * row[i] * row[j]
    return _solve(ata, aty)


def nelder_mead(f: Callable[[list[float]], float], x0: Sequence[float], step: float = 0.5,
                iters: int = 400, tol: float = 1e-9) -> list[float]:
    """Minimise ``f`` from ``x0`` with the Nelder-Mead simplex (small, dependency-free)."""
    dim = len(x0)
    pts = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(dim)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(dim + 1), key=lambda i: vals[i])
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (abs(vals[0]) + tol):
            break
        cen = [sum(p[j] for p in pts[:-1]) / dim for j in range(dim)]
        refl = [c + (c - w) for c, w in zip(cen, pts[-1])]
        fr = f(refl)
        if fr < vals[0]:
            exp_ = [c + 2 * (c - w) for c, w in zip(cen, pts[-1])]
            fe = f(exp_)
            pts[-1], vals[-1] = (exp_, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(cen, pts[-1])]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                best = pts[0]
                pts = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, p)] for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[min(range(dim + 1), key=lambda i: vals[i])]


def _minimise(f: Callable[[list[float]], float], u0: Sequence[float], step: float, iters: int = 600,
              restarts: int = 8) -> list[float]:
    """Nelder-Mead restarted from its own best point until the objective stops improving (relative 1e-6).
    One run can stall on a collapsed simplex short of the minimum; the fit then depended on its starting
    point (the shipped defaults), so a refit starting from its own result moved."""
    u, best = list(u0), f(list(u0))
    for _ in range(restarts):
        cand = nelder_mead(f, u, step=step, iters=iters)
        val = f(cand)
        improved = val < best * (1 - 1e-6)
        if val < best:
            u, best = cand, val
        if not improved:
            break
    return u


def _fit_transport(records: Sequence[BenchRecord], peer_GBps: float) -> dict[str, float] | None:
    """alpha (per transport), bw_max and t_msg from the transport sweep.

    Model: ``t = alpha_transport + (bytes + j * s_half) / bw_max`` for j messages to ONE peer (p2p_one_peer:
    j = 1, a2a_single: j = 1, p2p_same_peer_split: j = messages <= 4; the 7-way split is left out: NCCL
    runs it out of its fast path at >= 32 MiB and TASP never sends two pieces to one peer).
    """
    rows, y = [], []
    for r in records:
        if r.kind != "transport" or not r.timed:
            continue
        if r.impl not in ("p2p_one_peer", "a2a_single", "p2p_same_peer_split") or r.messages > 4:
            continue
        a2a = r.impl == "a2a_single"
        rows.append([1.0 if a2a else 0.0, 0.0 if a2a else 1.0, float(r.bytes) / 1e9, float(r.messages)])
        y.append(float(r.time_ms))
    if len(rows) < 6:
        return None
    a2a, p2p, ms_per_gb, tmsg = _weighted_lsq(rows, y)
    bw = 1e3 / ms_per_gb  # GB/s
    err = [(sum(c * x for c, x in zip(row, (a2a, p2p, ms_per_gb, tmsg))) / yi - 1) for row, yi in zip(rows, y)]
    return {"alpha_a2a_us": max(a2a, 0.0) * 1e3, "alpha_p2p_us": max(p2p, 0.0) * 1e3, "bw_max_GBps": bw,
            "link_efficiency": min(bw / peer_GBps, 1.0), "msg_overhead_us": max(tmsg, 0.0) * 1e3,
            "s_half_MB": max(tmsg, 0.0) * bw / 1e3 * 1e3, "records": len(rows),
            "rms_rel_err": math.sqrt(sum(e * e for e in err) / len(err)), "max_rel_err": max(abs(e) for e in err)}


def _fit_rates(records: Sequence[BenchRecord]) -> dict[str, Any] | None:
    """Kernel rate curves from single-GPU records: fwd from ``fwd``, bwd from ``fwd_bwd - fwd``."""
    by = {(r.tokens_per_gpu, r.batch, r.heads_q, r.heads_kv, r.head_dim, r.causal, r.passes): r
          for r in _attention(records, "single_gpu")}
    fr, fy, br, by_ = [], [], [], []
    for key, r in by.items():
        if key[-1] != "fwd":
            continue
        shape = record_shape(r)
        f = shape.block_flops(shape.tokens_per_gpu, shape.tokens_per_gpu) * (0.5 if shape.causal else 1.0)
        fr.append([f / 1e9, 1.0])
        fy.append(float(r.time_ms))
        fb = by.get(key[:-1] + ("fwd_bwd",))
        if fb is not None and fb.time_ms > r.time_ms:
            br.append([2.5 * f / 1e9, 1.0])
            by_.append(float(fb.time_ms) - float(r.time_ms))
    if len(fr) < 2 or len(br) < 2:
        return None
    out: dict[str, Any] = {}
    for name, rows, y in (("fwd", fr, fy), ("bwd", br, by_)):
        ms_per_gf, c = _weighted_lsq(rows, y)
        peak = 1.0 / ms_per_gf  # TFLOP/s (GFLOP per ms)
        rate = KernelRate(peak_tflops=peak, half_gflop=max(c, 0.0) * peak)
        err = [rate.time_ms(row[0] * 1e9) / yi - 1 for row, yi in zip(rows, y)]
        out[name] = rate
        out[f"{name}_rms_rel_err"] = math.sqrt(sum(e * e for e in err) / len(err))
        out[f"{name}_max_rel_err"] = max(abs(e) for e in err)
        out[f"{name}_records"] = len(rows)
    return out


@lru_cache(maxsize=64)
def calibration_topology(name: str, cp: int) -> Topology:
    """The topology a record set ran on: the named preset or file, else a generic node of ``cp`` GPUs (with
    the named topology's link numbers when its size differs)."""
    try:
        topo = load_topology(name)
    except (OSError, ValueError):
        topo = generic_topology(cp)
    if topo.world_size != cp:
        topo = replace(generic_topology(cp), intra_node=topo.intra_node)
    return topo


def predict_record(rec: BenchRecord, calib: Calibration, topo_name: str) -> Prediction:
    """The model's prediction of one tasp or compute_only record, with what the record ran (kept KV)."""
    topo = calibration_topology(topo_name, rec.cp)
    transport = "none" if rec.impl == "compute_only" else (rec.transport or "a2a")
    return predict(topo, record_shape(rec), rec.num_rings or 1, calib, transport=transport,
                   keep_kv=bool(rec.keep_kv))


def _sq_log_err(records: Sequence[BenchRecord], calib: Calibration, topo_name: str) -> float:
    return sum(math.log(predict_record(r, calib, topo_name).total_ms / r.time_ms) ** 2 for r in records)


def _rel_errs(records: Sequence[BenchRecord], calib: Calibration, topo_name: str) -> list[float]:
    return [predict_record(r, calib, topo_name).total_ms / r.time_ms - 1 for r in records]


def _fit_compute_only(co: Sequence[BenchRecord], calib: Calibration, topo_name: str) -> Calibration:
    """Memory bandwidth (capped) and the host terms from the compute_only records."""
    def mk(u: list[float]) -> Calibration:
        return replace(calib, mem_GBps=min(math.exp(u[0]), MEM_CAP_GBPS), host_fwd_ms=math.exp(u[1]),
                       host_bwd_ms=math.exp(u[2]), host_prefix_ms=math.exp(u[3]))
    u0 = [math.log(FIT_START[k]) for k in ("mem_GBps", "host_fwd_ms", "host_bwd_ms", "host_prefix_ms")]
    return mk(_minimise(lambda u: _sq_log_err(co, mk(u), topo_name), u0, step=0.3))


def _fit_tasp(tasp: Sequence[BenchRecord], calib: Calibration, topo_name: str) -> Calibration:
    """Per-exchange host times and the interference from the tasp records (a transport with no records keeps
    its prior host cost)."""
    seen = {r.transport for r in tasp}

    def mk(u: list[float]) -> Calibration:
        return replace(calib, host_exchange_a2a_ms=math.exp(u[0]) if "a2a" in seen else calib.host_exchange_a2a_ms,
                       host_exchange_p2p_ms=math.exp(u[1]) if "p2p" in seen else calib.host_exchange_p2p_ms,
                       interference=1.0 / (1.0 + math.exp(-u[2])))
    g0 = min(max(FIT_START["interference"], 1e-3), 0.999)
    u0 = [math.log(FIT_START["host_exchange_a2a_ms"]), math.log(FIT_START["host_exchange_p2p_ms"]),
          math.log(g0 / (1 - g0))]
    return mk(_minimise(lambda u: _sq_log_err(tasp, mk(u), topo_name), u0, step=0.5))


#: The shipped 2-GPU preset of each machine the CP=2 records were measured on, by the exact device name the
#: records carry (``torch.cuda.get_device_name``; "NVIDIA H200" is the SXM part, not H200 NVL or GH200); any
#: other device gets :data:`DEFAULT_CP2_TOPOLOGY`.
CP2_TOPOLOGY_BY_DEVICE: tuple[tuple[str, str], ...] = (("NVIDIA H200", "h200-nv18-2"),)
DEFAULT_CP2_TOPOLOGY = "h100-nv18-2"


def cp2_topology_for(devices: Sequence[str]) -> str:
    """The 2-GPU preset of the machine named by ``devices`` (the records' device names): ``h200-nv18-2`` for
    an H200, else ``h100-nv18-2``. Records from more than one kind of device have no single machine."""
    names = sorted({d for d in devices if d})
    picks = {next((t for key, t in CP2_TOPOLOGY_BY_DEVICE if key == d), DEFAULT_CP2_TOPOLOGY) for d in names}
    if len(picks) > 1:
        raise CostModelError(f"records from more than one machine ({', '.join(names)}); calibrate one machine's "
                             "records at a time or name the machine (calibrate(topology=...), "
                             "simulate --calib-topology)")
    return picks.pop() if picks else DEFAULT_CP2_TOPOLOGY


def _topology_name(topology: Topology | str | None, cp: int, devices: Sequence[str]) -> str:
    if topology is None:
        return cp2_topology_for(devices) if cp == 2 else f"generic-{cp}"
    if isinstance(topology, Topology):
        return topology.source or topology.name
    return str(topology)


def calibrate(records: Sequence[BenchRecord | Mapping[str, Any]],
              topology: Topology | str | None = None) -> Calibration:
    """Fit a Calibration to benchmark records of one machine (``megatron-tasp bench`` JSON).

    ``topology`` is the machine the records were taken on (default for CP=2 records: the shipped 2-GPU preset
    of the records' device, ``h200-nv18-2`` for an H200, else ``h100-nv18-2``; a generic NVSwitch node for
    other CP sizes); its ``peer_GBps`` turns the measured bandwidth into the link efficiency. Missing record
    kinds keep the shipped defaults (reported in ``fit``).
    """
    recs = _as_records(records)
    attn = [r for r in recs if r.kind == "attention" and modelled(r)]
    cps = sorted({r.cp for r in attn if r.impl in ("tasp", "compute_only")})
    topo_name = _topology_name(topology, cps[0] if cps else 2, [r.device for r in recs])
    topo = calibration_topology(topo_name, cps[0] if cps else 2)
    fit: dict[str, Any] = {"calibration_topology": topo_name}
    calib = replace(default_calibration(), calibration_topology=topo_name, fit=fit,
                    machine=next((r.device for r in recs if r.device), ""),
                    source=",".join(sorted({r.source for r in recs if r.source})))
    tr = _fit_transport(recs, topo.intra_node.peer_GBps)
    if tr is not None:
        fit["transport"] = tr
        calib = replace(calib, alpha_a2a_us=tr["alpha_a2a_us"], alpha_p2p_us=tr["alpha_p2p_us"],
                        link_efficiency=tr["link_efficiency"], msg_overhead_us=tr["msg_overhead_us"])
    rates = _fit_rates(recs)
    if rates is not None:
        fit["kernels"] = {k: (asdict(v) if isinstance(v, KernelRate) else v) for k, v in rates.items()}
        calib = replace(calib, fwd=rates["fwd"], bwd=rates["bwd"])
    co = _attention(recs, "compute_only")
    if len(co) >= 4:
        calib = _fit_compute_only(co, calib, topo_name)
        fit["compute_only"] = summarize(_rel_errs(co, calib, topo_name))
    tasp = _attention(recs, "tasp")
    if len(tasp) >= 3:
        calib = _fit_tasp(tasp, calib, topo_name)
        fit["tasp"] = summarize(_rel_errs(tasp, calib, topo_name))
    return calib


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """A calibration JSON (``Calibration.save``) or a benchmark records file to calibrate on."""
    p = Path(path)
    if not p.is_file():
        raise CostModelError(f"calibration file {path} not found; write one with "
                             "`megatron-tasp simulate --save-calibration FILE`")
    data = json.loads(p.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return Calibration.from_dict(data)
    if isinstance(data, list):
        return calibrate(load_records([p]))
    raise CostModelError(f"{path}: neither a calibration object nor a list of benchmark records")
