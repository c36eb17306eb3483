"""``megatron-tasp simulate``: calibrate the cost model on a measured benchmark, report its error against
every measurement, then PREDICT TASP (max rings) vs 1 ring (zigzag ring attention) on other topologies.

Everything after the error table is a model prediction, not a measurement, and is labelled so in the
output, the JSON (``"label"``) and the plot. See docs/COSTMODEL.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from megatron_tasp.apps.simulate_tables import (
    HEADS,
    MD_END,
    MD_START,
    PAYS,
    fmt_tokens,
    markdown,
    peak_text,
    range_text,
    short,
    write_markdown,
)
from megatron_tasp.costmodel import (
    Calibration,
    CostModelError,
    Prediction,
    RecordError,
    Shape,
    load_records,
    predict,
    ring_counts,
)
from megatron_tasp.costmodel.fitting import calibrate, load_calibration
from megatron_tasp.costmodel.report import error_report
from megatron_tasp.options import default_options
from megatron_tasp.topology import Topology, load_topology

DEFAULT_TOPOLOGIES = ("h100-sxm-8", "mi300x-8", "h100-sxm-8x2", "h100-sxm-8x4")
DEFAULT_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
LABEL = "PREDICTED by the megatron-tasp cost model (not measured)"
ASSUMPTIONS = [
    "Calibrated on a 2-GPU machine: only 1 ring exists there, so multi-peer behaviour is not measured. It comes "
    "from the topology file's bandwidths (peer_GBps, gpu_egress_GBps, nic_GBps) times the measured link "
    "efficiency, plus the measured per-message overhead, applied per message.",
    "Messages to distinct peers run concurrently; a rank's intra-node pieces share its egress; inter-node pieces "
    "are limited by the GPU's NIC and by the node's NICs together (rings counted as built by the topology).",
    "NIC efficiency is assumed (0.9 of nominal); no inter-node measurement exists.",
    "Kernel rates, memory bandwidth, host overheads and the compute/communication interference are those of the "
    "calibration machine (the GPU named in the calibration's 'machine', with cuDNN and NCCL); for topologies of "
    "other GPUs (e.g. the H100 presets under an H200 fit; MI300X: ROCm kernels and RCCL unmeasured) they are a "
    "stand-in.",
    "Host overhead grows per step and per extra ring with shares measured from host time on CPU; the GPU hides "
    "the host except a fitted prefix.",
    "Rings are what the topology can build today (ring_counts); a k whose construction is missing is skipped.",
]


def _has_transport_sweep(path: Path) -> bool:
    try:
        return any(r.kind == "transport" for r in load_records([path]))
    except (OSError, RecordError, TypeError):
        return False


def default_bench() -> str:
    """The newest CP=2 benchmark, ``docs/benchmarks/<date>-*-cp2[-vN].json`` (latest date, then highest N),
    from the CWD or the repository, that holds a transport sweep (the link parameters are fitted on it;
    the newest file of all when none does)."""
    pat = re.compile(r"^(\d{4}-\d{2}-\d{2}).*-cp2(?:-v(\d+))?\.json$")
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        found = []
        for f in (root / "docs" / "benchmarks").glob("*-cp2*.json"):
            m = pat.match(f.name)
            if m:
                found.append((m.group(1), int(m.group(2) or 1), f))
        if found:
            found.sort(reverse=True)
            return str(next((f for *_, f in found if _has_transport_sweep(f)), found[0][2]))
    raise FileNotFoundError("no docs/benchmarks/*-cp2[-vN].json found; pass --bench FILE")


def _speedup_grid(lo: int, hi: int, per_octave: int = 4) -> list[int]:
    """Even token counts from lo to hi, ``per_octave`` points per doubling."""
    out, e = [], math.log2(lo)
    while e <= math.log2(hi) + 1e-9:
        t = int(round(2 ** e / 16)) * 16
        if not out or t != out[-1]:
            out.append(t)
        e += 1 / per_octave
    return out


def compare(topo: Topology, shape: Shape, calib: Calibration, kmax: int) -> dict[str, Any]:
    """1 ring vs ``kmax`` rings vs the best ring count for one shape (all predicted)."""
    ring = predict(topo, shape, 1, calib)
    tasp = predict(topo, shape, kmax, calib)
    best_k, best = 1, ring
    for k in ring_counts(topo):
        if k in (1, kmax):
            p = ring if k == 1 else tasp
        else:
            try:
                p = predict(topo, shape, k, calib)
            except CostModelError:
                continue
        if p.total_ms < best.total_ms:
            best_k, best = k, p
    return {"ring_ms": ring.total_ms, "tasp_ms": tasp.total_ms, "speedup": ring.total_ms / tasp.total_ms,
            "best_k": best_k, "best_ms": best.total_ms, "best_speedup": ring.total_ms / best.total_ms,
            "ring_exposed_comm_ms": ring.exposed_comm_ms, "tasp_exposed_comm_ms": tasp.exposed_comm_ms,
            "ring_bound": ring.bound, "tasp_bound": tasp.bound, "tasp_tflops_per_gpu": tasp.tflops_per_gpu,
            "ring_tflops_per_gpu": ring.tflops_per_gpu,
            "ring_step1": _step(ring, 1), "tasp_step1": _step(tasp, 1)}


def _step(p: Prediction, t: int) -> dict[str, float]:
    """Forward step t of a prediction: compute, communication in flight, exposed communication (ms)."""
    s = next(x for x in p.steps if x.passes == "fwd" and x.step == t)
    return {"compute_ms": s.compute_ms, "comm_ms": s.comm_ms, "exposed_ms": s.exposed_ms}


def crossover(topo: Topology, base: Shape, calib: Calibration, kmax: int, hi: int = 1 << 20) -> dict[str, Any]:
    """Where TASP (kmax rings) pays: the token range with predicted speedup >= PAYS (fine sweep up to ``hi``)."""
    grid = _speedup_grid(max(1024, 2 * kmax), hi)
    sp = [predict(topo, replace(base, tokens_per_gpu=t), 1, calib).total_ms
          / predict(topo, replace(base, tokens_per_gpu=t), kmax, calib).total_ms for t in grid]
    peak = max(range(len(grid)), key=lambda i: sp[i])
    out: dict[str, Any] = {"peak_speedup": sp[peak], "peak_tokens_per_gpu": grid[peak]}
    if sp[peak] < PAYS:
        out.update(pays_from=None, stops_paying_at=None, note="never pays (speedup < 1.05 everywhere)")
        return out
    first = next(i for i in range(len(grid)) if sp[i] >= PAYS)
    out["pays_from"] = grid[first] if first == 0 else _interp(grid, sp, first - 1, first)
    after = next((i for i in range(peak, len(grid)) if sp[i] < PAYS), None)
    if after is None:
        out["stops_paying_at"] = None
        out["note"] = f"still pays at {hi} tokens/GPU (end of sweep)"
    else:
        out["stops_paying_at"] = _interp(grid, sp, after - 1, after)
    return out


def _interp(grid: list[int], sp: list[float], i: int, j: int) -> int:
    """Tokens (log-interpolated) where the speedup crosses PAYS between grid points i and j."""
    a, b = sp[i], sp[j]
    f = 0.0 if a == b else (PAYS - a) / (b - a)
    return int(round(2 ** (math.log2(grid[i]) + f * (math.log2(grid[j]) - math.log2(grid[i])))))


def run_predictions(calib: Calibration, topologies: Sequence[Topology], tokens: Sequence[int]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All prediction rows and crossover rows for the BENCHMARKS.md shapes."""
    rows, cross = [], []
    for topo in topologies:
        ks = ring_counts(topo)
        kmax = max(ks)
        for passes in ("fwd", "fwd_bwd"):
            for hq, hkv in HEADS:
                for causal in (True, False):
                    base = Shape(tokens_per_gpu=tokens[0], heads_q=hq, heads_kv=hkv, head_dim=128, causal=causal,
                                 passes=passes)
                    for t in tokens:
                        row = {"topology": topo.name, "world_size": topo.world_size, "max_rings": topo.max_rings(),
                               "tasp_rings": kmax, "tokens_per_gpu": t, "heads_q": hq, "heads_kv": hkv,
                               "causal": causal, "pass": passes}
                        row.update(compare(topo, replace(base, tokens_per_gpu=t), calib, kmax))
                        rows.append(row)
                    ideal = crossover(topo, base, replace(calib, interference=0.0), kmax)
                    cross.append({"topology": topo.name, "tasp_rings": kmax, "heads_q": hq, "heads_kv": hkv,
                                  "causal": causal, "pass": passes, **crossover(topo, base, calib, kmax),
                                  "ideal_overlap": ideal})
    return rows, cross


def plot(rows: list[dict[str, Any]], path: str, calib: Calibration) -> None:
    """Speedup (TASP max rings / 1 ring) vs tokens per GPU, one panel per topology. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topos = list(dict.fromkeys(r["topology"] for r in rows))
    cols = 2 if len(topos) > 1 else 1
    nrows = (len(topos) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.2 * nrows), squeeze=False, sharey=True)
    styles = {("fwd", True): "-", ("fwd", False): "--", ("fwd_bwd", True): "-", ("fwd_bwd", False): "--"}
    colors = {("fwd", 32): "tab:blue", ("fwd", 8): "tab:cyan", ("fwd_bwd", 32): "tab:red", ("fwd_bwd", 8): "tab:orange"}
    for ax, name in zip(axes.flat, topos):
        sel = [r for r in rows if r["topology"] == name]
        for passes in ("fwd", "fwd_bwd"):
            for _, hkv in HEADS:
                for causal in (True, False):
                    pts = sorted((r["tokens_per_gpu"], r["speedup"]) for r in sel if r["pass"] == passes
                                 and r["heads_kv"] == hkv and r["causal"] == causal)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[(passes, causal)], marker="o", ms=3,
                            color=colors[(passes, hkv)],
                            label=f"{passes} 32/{hkv} {'causal' if causal else 'full'}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(PAYS, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name}: {sel[0]['tasp_rings']} rings vs 1 (n={sel[0]['world_size']})", fontsize=10)
        ax.set_xlabel("tokens per GPU")
        ax.set_ylabel("predicted speedup (ring time / TASP time)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(topos):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"PREDICTED (cost model calibrated on {calib.source or 'measurements'}), not measured",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_tokens(text: str | None) -> list[int]:
    """``--tokens 1024,4k`` (positive integers, 'k' = 1024); the default list without it."""
    if not text:
        return list(DEFAULT_TOKENS)
    try:
        tokens = [int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--tokens takes a comma list of integers (e.g. 1024,4k), got {text!r}") from None
    if any(t < 1 for t in tokens):
        raise ValueError(f"--tokens must be positive integers, got {text!r}")
    return tokens


def cmd_simulate(args: argparse.Namespace) -> int:
    """Entry of ``megatron-tasp simulate``. Every argument is checked before anything is printed."""
    topologies = [load_topology(t) for t in (args.topology or DEFAULT_TOPOLOGIES)]
    tokens = _parse_tokens(args.tokens)
    if args.interference is not None and not math.isfinite(args.interference):
        raise ValueError(f"--interference must be a finite number, got {args.interference}")
    bench = args.bench or [default_bench()]
    missing = [b for b in bench if not Path(b).is_file()]
    if missing:
        raise FileNotFoundError(f"--bench {missing[0]}: no such file (give benchmark records written by "
                                "`megatron-tasp bench --out FILE`)")
    records = load_records(bench)
    cal_file = args.calibration if args.calibration is not None else default_options().calibration
    given = load_calibration(cal_file) if cal_file else None
    if given is not None:  # a given calibration: no fit; the error report measures it against --bench
        calib = given
        print(f"calibration from {cal_file} ({calib.machine}, topology {calib.calibration_topology}); "
              f"error against {', '.join(bench)}")
    else:
        calib = calibrate(records, topology=args.calib_topology)
        print(f"calibrated on {', '.join(bench)} ({calib.machine}, topology {calib.calibration_topology})")
    if args.interference is not None:
        calib = replace(calib, interference=args.interference)
    rep = error_report(records, calib)
    fit = calib.to_dict()
    fitted = {k: v for k, v in fit.items() if k not in ("fit", "kind")}
    print("parameters: " + ", ".join(f"{k}={short(v)}" for k, v in fitted.items()
                                     if k not in ("machine", "source", "calibration_topology")))
    if not args.quiet:
        print("\nmodel vs MEASURED, every TASP record (rel.err = predicted/measured - 1):")
        print(rep.table("tasp"))
        print("\nmodel vs MEASURED, compute-only records (fit of kernels/memory/host):")
        print(rep.table("compute_only"))
    print("\nerror summary:")
    for key, s in rep.summary.items():
        if s.get("records"):
            print(f"  {key:<22} n={s['records']:>3}  median |err| {s['median_abs_rel_err']:6.1%}  "
                  f"mean |err| {s['mean_abs_rel_err']:6.1%}  rms {s['rms_rel_err']:6.1%}  "
                  f"max |err| {s['max_abs_rel_err']:6.1%}")
    if args.save_calibration:
        calib.save(args.save_calibration)
        print(f"\nwrote calibration to {args.save_calibration}")
    rows, cross = run_predictions(calib, topologies, tokens)
    print(f"\n=== {LABEL} ===")
    print("speedup = time(1 ring, zigzag ring attention) / time(TASP, max rings the topology builds); "
          "best = best ring count")
    for topo in topologies:
        sel = [r for r in rows if r["topology"] == topo.name]
        kmax = sel[0]["tasp_rings"]
        note = "" if kmax == topo.max_rings() else f" (max {topo.max_rings()}; larger k not buildable yet)"
        print(f"\n[{topo.name}] n={topo.world_size}, TASP = {kmax} rings{note} -- PREDICTED")
        print(f"  {'pass':<7} {'heads':<5} {'mask':<6} " + " ".join(f"{fmt_tokens(t):>11}" for t in tokens))
        for passes in ("fwd", "fwd_bwd"):
            for hq, hkv in HEADS:
                for causal in (True, False):
                    cells = []
                    for t in tokens:
                        r = next(x for x in sel if x["pass"] == passes and x["heads_kv"] == hkv
                                 and x["causal"] == causal and x["tokens_per_gpu"] == t)
                        cells.append(f"{r['speedup']:5.2f}x(k{r['best_k']})")
                    print(f"  {passes:<7} {hq}/{hkv:<2} {'causal' if causal else 'full':<6} " + " ".join(
                        f"{c:>11}" for c in cells))
        print("  crossover (PREDICTED): TASP pays (speedup >= 1.05) from .. to tokens/GPU")
        for c in (x for x in cross if x["topology"] == topo.name):
            rng = range_text(c)
            print(f"    {c['pass']:<7} {c['heads_q']}/{c['heads_kv']:<2} {'causal' if c['causal'] else 'full':<6} "
                  f"{rng:<16} peak {peak_text(c):<18} | ideal overlap: {range_text(c['ideal_overlap'])}")
    doc = {"kind": "megatron-tasp-predictions", "label": LABEL, "bench": [Path(b).name for b in bench],
           "calibration": fit, "assumptions": ASSUMPTIONS,
           "error_report": {"summary": rep.summary, "rows": rep.rows},
           "predictions": rows, "crossover": cross,
           "definitions": {"speedup": "ring_ms / tasp_ms (1 ring vs max buildable rings)",
                           "pays": f"speedup >= {PAYS}",
                           "best_k": "ring count with the lowest predicted time"}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    if args.markdown:
        write_markdown(args.markdown, markdown(doc))
        print(f"wrote {args.markdown}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot, calib)
        print(f"wrote {args.plot}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    p = sub.add_parser("simulate", help="calibrate the cost model on a benchmark and predict other topologies",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", action="append", metavar="FILE.json",
                   help="benchmark records to calibrate on (repeatable; default: the newest "
                        "docs/benchmarks/*-cp2[-vN].json)")
    p.add_argument("--topology", "-t", action="append", metavar="NAME|FILE",
                   help=f"topology to predict (repeatable; default: {', '.join(DEFAULT_TOPOLOGIES)})")
    p.add_argument("--tokens", help="tokens per GPU to predict (comma list; 'k' = 1024; default 1K..64K)")
    p.add_argument("--calib-topology", default=None,
                   help="topology the benchmark ran on (default for CP=2 records: the 2-GPU preset of the "
                        "records' device, h200-nv18-2 for an H200, else h100-nv18-2)")
    p.add_argument("--interference", type=float, default=None,
                   help="override the fitted compute/communication interference gamma (sensitivity studies)")
    p.add_argument("--calibration", metavar="FILE.json", default=None,
                   help="predict with this calibration (a --save-calibration file, or a records file to fit) "
                        "instead of fitting on --bench (default: TaspOptions.calibration, i.e. "
                        "MEGATRON_TASP_CALIBRATION; unset: fit on --bench)")
    p.add_argument("--save-calibration", metavar="OUT.json", help="write the calibration in use (for "
                   "TaspOptions.calibration / MEGATRON_TASP_CALIBRATION)")
    p.add_argument("--json", metavar="OUT.json", help="write the error report and predictions as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot predicted speedup vs tokens per GPU")
    p.add_argument("--markdown", metavar="FILE.md", help="write the tables as Markdown (replaces the text "
                   f"between {MD_START} and {MD_END} when FILE.md has them)")
    p.add_argument("--quiet", action="store_true", help="print the error summary only, not every record")
    p.set_defaults(func=cmd_simulate)
