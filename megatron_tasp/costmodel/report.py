"""Predicted vs measured: the model's error against every TASP and compute-only record (offline)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_tasp.costmodel.fitting import _as_records, modelled, predict_record, summarize
from megatron_tasp.costmodel.params import PASSES, Calibration
from megatron_tasp.costmodel.records import BenchRecord
from megatron_tasp.topology import Topology

__all__ = ["ErrorReport", "error_report"]


@dataclass
class ErrorReport:
    """Predicted vs measured for every TASP (and compute-only) record of the calibration machine."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    def table(self, impl: str = "tasp") -> str:
        """A plain-text table of one impl's rows."""
        lines = [f"{'impl':<12} {'tr':<4} k kv   {'tok/GPU':>7} {'heads':>5} {'mask':<6} {'pass':<7} "
                 f"{'measured':>9} {'predicted':>9} {'rel.err':>8}"]
        for r in self.rows:
            if r["impl"] != impl:
                continue
            kept = "kept" if r["keep_kv"] else "sent"
            lines.append(f"{r['impl']:<12} {r['transport']:<4} {r['num_rings']} {kept} {r['tokens_per_gpu']:>7} "
                         f"{r['heads_q']:>2}/{r['heads_kv']:<2} {'causal' if r['causal'] else 'full':<6} "
                         f"{r['pass']:<7} {r['measured_ms']:>9.3f} {r['predicted_ms']:>9.3f} {r['rel_err']:>+8.1%}")
        return "\n".join(lines)


def error_report(records: Sequence[BenchRecord | Mapping[str, Any]], calib: Calibration,
                 topology: Topology | str | None = None) -> ErrorReport:
    """Predicted vs measured time of every modelled TASP and compute-only record (rel. error = pred/meas - 1)."""
    topo_name = calib.calibration_topology if topology is None else (
        topology.source or topology.name if isinstance(topology, Topology) else str(topology))
    rows = []
    for r in _as_records(records):
        if r.kind != "attention" or r.impl not in ("tasp", "compute_only") or not modelled(r):
            continue
        p = predict_record(r, calib, topo_name)
        rows.append({"impl": r.impl, "transport": p.transport, "num_rings": p.num_rings, "cp": r.cp,
                     "tokens_per_gpu": r.tokens_per_gpu, "heads_q": r.heads_q, "heads_kv": r.heads_kv,
                     "causal": r.causal, "pass": r.passes, "keep_kv": p.keep_kv, "measured_ms": float(r.time_ms),
                     "predicted_ms": p.total_ms, "rel_err": p.total_ms / float(r.time_ms) - 1, "bound": p.bound,
                     "exposed_comm_ms": p.exposed_comm_ms})
    summary: dict[str, Any] = {}
    for impl in ("tasp", "compute_only"):
        sel = [r for r in rows if r["impl"] == impl]
        summary[impl] = summarize([r["rel_err"] for r in sel])
        if impl == "tasp":
            for key, vals in (("pass", PASSES), ("transport", ("a2a", "p2p")), ("keep_kv", (True, False))):
                for v in vals:
                    errs = [r["rel_err"] for r in sel if r[key] == v]
                    if errs:
                        name = {True: "kept KV", False: "KV sent again"}.get(v, v) if key == "keep_kv" else v
                        summary[f"{impl}/{name}"] = summarize(errs)
        big = [r["rel_err"] for r in sel if r["tokens_per_gpu"] >= 8192]
        if big:
            summary[f"{impl}/tokens>=8K"] = summarize(big)
    return ErrorReport(rows=rows, summary=summary)
