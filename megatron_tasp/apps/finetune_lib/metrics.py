"""Run metrics on rank 0: progress bar, log lines, metrics.json and the loss plot.

Log lines go to the ``megatron_tasp.finetune`` logger (the CLI prints them to stdout, through tqdm's
writer when a bar is shown); the tqdm bar is drawn only when stderr is a terminal, never into a log file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("megatron_tasp.finetune")


class ProgressLog:
    """A tqdm bar (when available, enabled and stderr is a terminal) plus a log line every ``interval`` steps."""

    def __init__(self, total: int, initial: int, interval: int, enabled: bool, bar: bool, desc: str) -> None:
        self.enabled = enabled
        self.interval = interval
        self._bar: Any = None
        tty = sys.stderr.isatty()
        self._bar_args = dict(total=total, initial=initial, desc=desc) if enabled and bar and tty else None

    def start(self) -> None:
        """Show the bar (call after the start-up lines, so they are not interleaved with it)."""
        if self._bar_args is None or self._bar is not None:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(**self._bar_args, unit="step", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def write(self, line: str) -> None:
        """Log a line (rank 0 only)."""
        if self.enabled:
            logger.info(line)

    def step(self, rec: dict[str, Any], total: int) -> None:
        """Advance the bar with a step record and print its line when due."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
        if rec["step"] % self.interval == 0 or rec["step"] == total:
            self.write(f"step {rec['step']:5d}/{total}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                       f"grad_norm {rec['grad_norm']:.3f}  {rec['step_time_s'] * 1e3:7.0f} ms  "
                       f"{rec['tokens_per_s']:,.0f} tok/s")

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta ** (i + 1)))
    return out


def summarize(steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """First/last losses (raw, and averaged over up to 10 steps) and mean throughput after the first step."""
    out: dict[str, Any] = {}
    if steps:
        losses = [s["loss"] for s in steps]
        k = min(10, len(losses))
        out.update(first_loss=losses[0], last_loss=losses[-1], first_loss_mean10=sum(losses[:k]) / k,
                   last_loss_mean10=sum(losses[-k:]) / k)
        timed = steps[1:] or steps
        out["mean_tokens_per_s"] = sum(s["tokens_per_s"] for s in timed) / len(timed)
    losses = [e for e in evals if "loss" in e]  # an evaluation may be the passkey check alone
    if losses:
        out.update(first_eval_loss=losses[0]["loss"], last_eval_loss=losses[-1]["loss"])
    return out


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON document, or {} if missing/unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def plot_loss(path: Path, steps: list[dict[str, Any]], evals: list[dict[str, Any]], title: str,
              uniform_loss: float | None = None) -> bool:
    """Loss curve (raw, smoothed, held-out) to a PNG; False when matplotlib is missing or nothing to plot.

    ``uniform_loss`` (ln of the vocabulary) is drawn as a dotted reference line: the loss of a uniform guess.
    """
    if not steps:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = [s["step"] for s in steps]  # step N: after N optimizer steps (as the held-out points)
    y = [s["loss"] for s in steps]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    ax.plot(x, y, color="#9ecae1", linewidth=1.0, label="train loss (per step)")
    ax.plot(x, ema(y), color="#08519c", linewidth=2.0, label="train loss (EMA 0.9)")
    evals = [e for e in evals if "loss" in e]
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="#d94801", linewidth=1.5,
                markersize=4, label="held-out loss")
    if uniform_loss is not None:
        ax.axhline(uniform_loss, color="grey", linestyle=":", linewidth=1.0, label="uniform guess")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


__all__ = ["ProgressLog", "ema", "plot_loss", "read_json", "summarize", "write_json"]
