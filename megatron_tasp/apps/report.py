"""``megatron-tasp report``: plots and Markdown tables generated from benchmark JSON files.

The README's performance table and docs/PERFORMANCE.md's tables are produced here from the committed
files in docs/benchmarks/, never typed by hand.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from megatron_tasp.costmodel.records import BenchRecord, load_records

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
COLUMNS = ("tasp", "compute_only", "kernel_bound", "torch_cp_allgather", "torch_cp_alltoall", "single_gpu")


def _attention(records: list[BenchRecord]) -> list[BenchRecord]:
    return [r for r in records if r.kind == "attention" and r.timed]


def best_by_shape(records: list[BenchRecord]) -> dict[tuple, dict[str, BenchRecord]]:
    """{(cp, tokens/GPU, hq, hkv, causal, pass): {impl: fastest record}} (single GPU keyed by the CP run)."""
    recs = _attention(records)
    cps = sorted({r.cp for r in recs if r.impl != "single_gpu"})
    table: dict[tuple, dict[str, BenchRecord]] = defaultdict(dict)
    for r in recs:
        if r.impl == "single_gpu":
            for cp in cps:  # the single-GPU run did the whole sequence of a CP run: tokens = cp * tokens/GPU
                if r.tokens_per_gpu % cp == 0:
                    table[(cp, r.tokens_per_gpu // cp, r.heads_q, r.heads_kv, r.causal, r.passes)]["single_gpu"] = r
            continue
        k = (r.cp, r.tokens_per_gpu, r.heads_q, r.heads_kv, r.causal, r.passes)
        cur = table[k].get(r.impl)
        if cur is None or r.time_ms < cur.time_ms:
            table[k][r.impl] = r
    return {k: v for k, v in table.items() if any(i != "single_gpu" for i in v)}


def _ratio(row: dict[str, BenchRecord], impl: str) -> str:
    """TASP time / ``impl`` time of one table row ('-' when either is missing)."""
    t, other = row.get("tasp"), row.get(impl)
    return f"{t.time_ms / other.time_ms:.2f}" if t and other else "-"


def markdown_table(records: list[BenchRecord], passes: tuple[str, ...] = ("fwd", "fwd_bwd"),
                   causal: tuple[bool, ...] = (True, False)) -> str:
    """TFLOP/s per GPU by shape and implementation (TASP: its fastest ring count and transport)."""
    table = best_by_shape(records)
    meta = next(iter(_attention(records)), None) or BenchRecord(impl="?")
    lines = [f"TFLOP/s per GPU ({meta.device or '?'}, torch {meta.torch or '?'}, NCCL {meta.nccl or '?'}, "
             f"{meta.dtype}, head dim {meta.head_dim or '?'}, batch {meta.batch}, measured {meta.date or '?'}). "
             "TASP: its fastest measured configuration (`TASP via`: transport, rings, chunks, KV kept for the "
             "backward). `vs PyTorch CP` = TASP time / best PyTorch CP time (< 1 is faster); `vs bound` = TASP "
             "time / compute-only time; `vs kernels` = TASP time / kernel-bound time (the same block kernels "
             "alone: no merge, no engine, no communication).", "",
             "| CP | tokens/GPU | heads q/kv | mask | pass | TASP | TASP via | compute-only | kernel-bound | "
             "PyTorch CP all-gather | PyTorch CP all-to-all | single GPU | vs PyTorch CP | vs bound | vs kernels |",
             "|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in sorted(table, key=lambda k: (k[0], k[5], not k[4], k[3], k[1])):
        cp, tok, hq, hkv, c, p = k
        if p not in passes or c not in causal:
            continue
        row = table[k]
        cells = [f"{row[n].tflops_per_gpu:.0f}" if n in row else "-" for n in COLUMNS]
        t = row.get("tasp")
        torch_best = min((row[i] for i in ("torch_cp_allgather", "torch_cp_alltoall") if i in row),
                         key=lambda r: r.time_ms, default=None)
        vs_torch = f"{t.time_ms / torch_best.time_ms:.2f}" if t and torch_best else "-"
        via = "-"
        if t:
            via = f"{t.transport or '?'}, k={t.num_rings}"
            if t.chunks > 1:
                via += f", {t.chunks} chunks"
            if t.keep_kv:
                via += ", kept KV"
        lines.append(f"| {cp} | {tok} | {hq}/{hkv} | {'causal' if c else 'none'} | {p} | {cells[0]} | {via} | " +
                     " | ".join(cells[1:]) + f" | {vs_torch} | {_ratio(row, 'compute_only')} | "
                     f"{_ratio(row, 'kernel_bound')} |")
    return "\n".join(lines)


def plot(records: list[BenchRecord], path: str) -> None:
    """TFLOP/s per GPU vs tokens per GPU, one panel per (heads, mask, pass); plus transport bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = best_by_shape(records)
    panels = sorted({(k[0], k[2], k[3], k[4], k[5]) for k in table})
    transport = [r for r in records if r.kind == "transport" and r.timed]
    n = len(panels) + (1 if transport else 0)
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    styles = {"tasp": ("C0", "o-"), "compute_only": ("C2", "--"), "kernel_bound": ("C4", "-."),
              "torch_cp_allgather": ("C1", "s:"),
              "torch_cp_alltoall": ("C3", "^:"), "single_gpu": ("k", "-.")}
    for ax, (cp, hq, hkv, c, p) in zip(axes.flat, panels):
        keys = sorted(k for k in table if (k[0], k[2], k[3], k[4], k[5]) == (cp, hq, hkv, c, p))
        for impl, (color, style) in styles.items():
            xs = [k[1] for k in keys if impl in table[k]]
            ys = [table[k][impl].tflops_per_gpu for k in keys if impl in table[k]]
            if xs:
                ax.plot(xs, ys, style, color=color, label=impl.replace("_", " "), markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_title(f"CP={cp} h={hq}/{hkv} {'causal' if c else 'no mask'} {p}", fontsize=9)
        ax.set_xlabel("tokens per GPU", fontsize=8)
        ax.set_ylabel("TFLOP/s per GPU", fontsize=8)
        ax.grid(alpha=0.3)
    if transport:
        ax = axes.flat[len(panels)]
        by_mode: dict[str, list] = defaultdict(list)
        for r in transport:
            label = r.impl + (f" x{r.messages}" if r.impl == "p2p_same_peer_split" else "")
            by_mode[label].append((r.bytes / 2**20, r.GBps_per_direction))
        for label, pts in sorted(by_mode.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", markersize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"exchange bandwidth, CP={transport[0].cp}", fontsize=9)
        ax.set_xlabel("MiB per step", fontsize=8)
        ax.set_ylabel("GB/s per direction", fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 0.975))
    meta = next(iter(_attention(records)), None) or BenchRecord(impl="?")
    fig.suptitle(f"{meta.device} | torch {meta.torch} | {meta.date}", y=0.995,
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_readme(readme: str, table: str) -> None:
    """Replace the text between the bench-table markers of ``readme`` with ``table``."""
    text = Path(readme).read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    new = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{table}\n{END}", text, flags=re.S)
    Path(readme).write_text(new)


def cmd_report(args: argparse.Namespace) -> int:
    """Entry of ``megatron-tasp report``."""
    records = load_records(args.files)
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    full = markdown_table(records)
    if args.markdown:
        Path(args.markdown).write_text(full + "\n")
        print(f"wrote {args.markdown}")
    if args.readme:
        update_readme(args.readme, markdown_table(records, passes=("fwd_bwd",), causal=(True,)))
        print(f"updated the table in {args.readme}")
    if not (args.plot or args.markdown or args.readme):
        print(full)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    p = sub.add_parser("report", help="plot benchmark JSON files and generate the Markdown tables")
    p.add_argument("files", nargs="+", help="benchmark JSON files (docs/benchmarks/*.json)")
    p.add_argument("--plot", metavar="PNG", help="write a plot")
    p.add_argument("--markdown", metavar="MD", help="write the full table")
    p.add_argument("--readme", metavar="README", help="replace the table between the bench-table markers")
    p.set_defaults(func=cmd_report)
