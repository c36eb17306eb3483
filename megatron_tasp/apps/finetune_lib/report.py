"""What a run tells its user on rank 0: the start-up banner, metrics.json with the loss plot, the summary."""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.apps.finetune_lib.data import describe_dataset
from megatron_tasp.apps.finetune_lib.eval_report import plot_long_context, summarize_long_context, summary_parts
from megatron_tasp.apps.finetune_lib.metrics import plot_loss, summarize, write_json
from megatron_tasp.launch.lifecycle import signal_name


def _max_rings(run: Any) -> int:
    """Rings TASP uses by default for the run's CP group (the most its topology offers)."""
    from megatron_tasp.topology import generic_topology, load_topology

    topo = run.options.topology
    if topo is None:
        return generic_topology(run.recipe.parallel.cp).max_rings()
    return (load_topology(topo) if isinstance(topo, str) else topo).max_rings()


def _mcore_version() -> str:
    """The installed megatron-core release (its distribution's version, e.g. 0.19.2)."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:  # a source checkout on the path: its own version string
        try:
            from megatron.core import package_info

            return str(package_info.__version__)
        except ImportError:
            return "unknown"


def banner(run: Any, end: int) -> None:
    """Model, layout, data, start point and step range."""
    if not run.log.enabled:
        return
    r = run.recipe
    p = r.parallel
    if run.resumed_from:
        start = f"resuming from {run.resumed_from} (step {run.step}, {run.consumed} samples consumed)"
    elif run.initialized_from:
        start = f"weights from {run.initialized_from} (optimizer and step start fresh)"
    else:
        start = "random initialisation (training from scratch)"
    rings = run.options.num_rings
    if p.cp == 1:
        rings = "none"
    elif rings == 1:
        rings = "1 (ring)"
    elif rings is None:
        rings = f"{_max_rings(run)} (the most available)"
    optimizer = ("Megatron DDP + " + ("distributed optimizer" if r.train.distributed_optimizer else "optimizer")
                 if run.cuda else "CPU AdamW (flat all-reduce)")
    run.log.write(
        f"[finetune] {r.name}: {run.num_params / 1e6:.2f}M params, {r.model.num_layers} layers x "
        f"{r.model.hidden_size}, vocab {run.vocab}, seq {r.data.seq_length}, global batch "
        f"{r.train.global_batch} ({run.tokens_per_step:,} tokens/step)\n"
        f"[finetune] world {run.world} = tp {p.tp} x cp {p.cp} x dp {run.dp} on {run.device.type} "
        f"({dist.get_backend()}), CP backend {p.cp_backend if p.cp > 1 else 'none (cp=1)'}, rings {rings}, "
        f"precision {r.train.precision}, {optimizer}\n"
        f"[finetune] data: {r.data.source} ({r.data.format}), {describe_dataset(run.data)}; start: {start}\n"
        f"[finetune] steps {run.step} -> {end} of {r.train.steps}; output {run.out_dir}")
    if run.step >= end:
        limit = "" if run.opts.max_steps is None else f", --max-steps {run.opts.max_steps}"
        run.log.write(f"[finetune] nothing to train: step {run.step} already reached (train.steps={r.train.steps}"
                      f"{limit}); use checkpoint.resume=never or another logging.output_dir to start over")


def write_metrics(run: Any, loop_time: float, final: bool = False) -> dict[str, Any]:
    """The metrics document (every rank); rank 0 writes metrics.json and, at the end, loss.png."""
    r = run.recipe
    doc: dict[str, Any] = {
        "recipe": r.name, "recipe_source": r.source, "world_size": run.world, "tp": r.parallel.tp,
        "cp": r.parallel.cp, "dp": run.dp, "cp_backend": r.parallel.cp_backend, "num_rings": run.options.num_rings,
        "tasp_options": run.options.to_dict(),
        "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        "torch_version": torch.__version__, "megatron_core_version": _mcore_version(),
        "num_params": run.num_params, "vocab_size": run.vocab, "seq_length": r.data.seq_length,
        "global_batch": r.train.global_batch, "tokens_per_step": run.tokens_per_step,
        "train_steps": r.train.steps, "end_step": run.step,
        "stopped_by": signal_name(run.stopped_by) if run.stopped_by else None,
        "resumed_from": run.resumed_from, "initialized_from": run.initialized_from,
        "setup_time_s": run.setup_time, "train_time_s": loop_time, "checkpoints": run.checkpoints,
        "steps": run.records, "eval": run.evals,
    }
    if run.device.type == "cuda":
        doc["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    doc.update(summarize(run.records, run.evals))
    doc.update(summarize_long_context(run.evals))
    if run.is_logger:
        write_json(run.out_dir / "metrics.json", doc)
        if final and r.logging.plot:
            title = (f"{r.name}: seq {r.data.seq_length}, CP={r.parallel.cp} ({r.parallel.cp_backend}), "
                     f"DP={run.dp}, {run.num_params / 1e6:.1f}M params")
            if plot_loss(run.out_dir / "loss.png", run.records, run.evals, title, math.log(run.vocab)):
                doc["plot"] = str(run.out_dir / "loss.png")
            if plot_long_context(run.out_dir / "long_context.png", run.evals, title):
                doc["long_context_plot"] = str(run.out_dir / "long_context.png")
    return doc


def summary(run: Any, doc: dict[str, Any]) -> None:
    """First/last loss, held-out loss, throughput and where the outputs went."""
    if not run.records:
        return
    n = min(10, len(run.records))
    parts = [f"train loss {doc['first_loss_mean10']:.3f} -> {doc['last_loss_mean10']:.3f} (mean of the first/last "
             f"{n} steps; step {run.records[0]['step']}: {doc['first_loss']:.3f}, step "
             f"{run.records[-1]['step']}: {doc['last_loss']:.3f})"]
    if "first_eval_loss" in doc:
        parts.append(f"held-out {doc['first_eval_loss']:.3f} -> {doc['last_eval_loss']:.3f}")
    parts.extend(summary_parts(doc))
    parts.append(f"{doc['mean_tokens_per_s']:,.0f} tokens/s")
    done = f"stopped by {signal_name(run.stopped_by)} after step {run.step}" if run.stopped_by else "done"
    run.log.write(f"[finetune] {done}: " + ", ".join(parts))
    run.log.write(f"[finetune] wrote {run.out_dir / 'metrics.json'}" +
                  "".join(f", {doc[k]}" for k in ("plot", "long_context_plot") if k in doc) +
                  (f"; checkpoint {run.checkpoints[-1]}" if run.checkpoints else ""))


__all__ = ["banner", "summary", "write_metrics"]
