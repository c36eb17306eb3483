"""Long-context evaluation in the run's outputs: log lines, summary values and ``long_context.png``.

An evaluation record (``metrics.json``'s ``eval`` list) may carry ``position_loss`` (the position ``view``, bucket
``edges``, the mean ``loss`` and the ``tokens`` of each bucket) and ``passkey`` (the ``accuracy`` table, lengths
x depths); see :mod:`.evaluation` and :mod:`.passkey`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_tasp.apps.finetune_lib.evaluation import bucket_label


def _labels(edges: list[int]) -> list[str]:
    return [bucket_label(a, b) for a, b in zip(edges[:-1], edges[1:])]


def eval_line(step: int, result: dict[str, Any]) -> str:
    """One log line for an evaluation."""
    parts = [f"eval  after step {step:5d}"]
    if "loss" in result:
        parts.append(f"held-out loss {result['loss']:.4f}")
    pos = result.get("position_loss")
    if pos:
        cells = [f"{lab} {loss:.3f}" for lab, loss in zip(_labels(pos["edges"]), pos["loss"], strict=True)
                 if loss is not None]
        where = "document position" if pos.get("view") == "document" else "position"
        parts.append(f"by {where}: " + ", ".join(cells))
    pk = result.get("passkey")
    if pk:
        parts.append(f"passkey {pk['mean_accuracy']:.0%} ({len(pk['lengths'])} lengths x {len(pk['depths'])} "
                     f"depths x {pk['trials']} trials)")
    if "time_s" in result:
        parts.append(f"{result['time_s']:.1f} s")
    return "  ".join(parts)


def summarize_long_context(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary values: the last evaluation's loss in the first and last position bucket, its passkey accuracy."""
    out: dict[str, Any] = {}
    pos = [e for e in evals if e.get("position_loss")]
    if pos:
        last = pos[-1]["position_loss"]
        labels = _labels(last["edges"])
        out.update(last_position_loss_first_bucket=last["loss"][0], last_position_loss_last_bucket=last["loss"][-1],
                   position_buckets=f"{labels[0]} .. {labels[-1]}")
    keyed = [e for e in evals if e.get("passkey")]
    if keyed:
        out.update(first_passkey_accuracy=keyed[0]["passkey"]["mean_accuracy"],
                   last_passkey_accuracy=keyed[-1]["passkey"]["mean_accuracy"])
    return out


def summary_parts(doc: dict[str, Any]) -> list[str]:
    """Phrases for the run's closing summary line."""
    parts = []
    if "last_position_loss_last_bucket" in doc:
        first, last = doc["position_buckets"].split(" .. ")
        parts.append(f"held-out loss by position (last eval) {first}: {doc['last_position_loss_first_bucket']:.3f}"
                     f", {last}: {doc['last_position_loss_last_bucket']:.3f}")
    if "last_passkey_accuracy" in doc:
        parts.append(f"passkey accuracy {doc['first_passkey_accuracy']:.0%} -> {doc['last_passkey_accuracy']:.0%}")
    return parts


def plot_long_context(path: Path, evals: list[dict[str, Any]], title: str) -> bool:
    """Loss by position bucket per evaluation (later evaluations darker) and the last passkey accuracy heatmap
    (length x depth) to a PNG; False when matplotlib is missing or there is nothing to plot."""
    pos = [e for e in evals if e.get("position_loss")]
    keyed = [e for e in evals if e.get("passkey")]
    if not pos and not keyed:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = bool(pos) + bool(keyed)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.4), dpi=120, squeeze=False)
    axes = list(axes[0])
    if pos:
        ax = axes.pop(0)
        cmap = plt.get_cmap("Blues")
        for i, e in enumerate(pos):
            p = e["position_loss"]
            shade = 0.35 + 0.65 * (i / (len(pos) - 1) if len(pos) > 1 else 1.0)
            xs = [k for k, v in enumerate(p["loss"]) if v is not None]
            ax.plot(xs, [p["loss"][k] for k in xs], "o-", color=cmap(shade), markersize=3, linewidth=1.4,
                    label=f"step {e['step']}")
        labels = _labels(pos[-1]["position_loss"]["edges"])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        doc = pos[-1]["position_loss"].get("view") == "document"
        ax.set_xlabel(f"position in the {'document' if doc else 'sequence'} (tokens)")
        ax.set_ylabel("held-out loss (nats / token)")
        ax.set_title("loss by position (later evaluations darker)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    if keyed:
        ax = axes.pop(0)
        pk = keyed[-1]["passkey"]
        im = ax.imshow(pk["accuracy"], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(pk["depths"])), [f"{d:g}" for d in pk["depths"]])
        ax.set_yticks(range(len(pk["lengths"])), [str(n) for n in pk["lengths"]])
        for r, row in enumerate(pk["accuracy"]):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.5 else "white")
        ax.set_xlabel("pass key depth (share of the filler before it)")
        ax.set_ylabel("prompt length (tokens)")
        ax.set_title(f"passkey accuracy after step {keyed[-1]['step']} ({pk['trials']} trials per cell)",
                     fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


__all__ = ["eval_line", "plot_long_context", "summarize_long_context", "summary_parts"]
