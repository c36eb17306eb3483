"""The fine-tuning loop on an initialised default process group (one process per rank, CPU/gloo or GPU/NCCL).

Per step: each DP rank takes its share of ``train.global_batch`` sequences (in micro-batches), each CP rank
its zigzag half-chunks (Megatron's ``get_batch_on_this_cp_rank``); the loss is the mean over all tokens
of the global batch; gradients are summed over the DP x CP group onto the owner of each parameter
(:mod:`.optimizer`), clipped, stepped with AdamW on fp32 masters and broadcast back. Held-out loss,
checkpoints, metrics.json and loss.png follow the recipe.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_tasp.apps.finetune_lib import checkpoint as ckpt
from megatron_tasp.apps.finetune_lib.data import SequenceDataset, build_token_cache, cache_path, model_inputs
from megatron_tasp.apps.finetune_lib.metrics import ProgressLog, plot_loss, read_json, summarize, write_json
from megatron_tasp.apps.finetune_lib.model import build_model, count_parameters
from megatron_tasp.apps.finetune_lib.optimizer import ShardedAdamW, lr_at
from megatron_tasp.apps.finetune_lib.recipe import Recipe, RecipeError
from megatron_tasp.apps.finetune_lib.tokenizer import build_tokenizer

FORMAT = "megatron-tasp-finetune/1"


@dataclass
class RunOptions:
    """Per-invocation options that are not part of the recipe."""

    max_steps: int | None = None  # stop after this many steps in total (the LR schedule still spans train.steps)
    fault_hook: Callable[[str], None] | None = None  # tests: called inside checkpoint saves
    log: bool = True  # progress bar and log lines on rank 0


def resolve_device(recipe: Recipe) -> torch.device:
    """The device of this rank (cuda:LOCAL_RANK, or cpu)."""
    want = recipe.parallel.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RecipeError(f"{recipe.source}: parallel.device: cuda but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed_everything(seed: int) -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def _max_rings(recipe: Recipe) -> int:
    """Rings TASP uses by default for this recipe's CP group (the most its topology offers)."""
    from megatron_tasp.topology import generic_topology, load_topology

    p = recipe.parallel
    topo = load_topology(os.path.expandvars(os.path.expanduser(p.topology))) if p.topology else \
        generic_topology(p.cp)
    return topo.max_rings()


def _mcore_version() -> str:
    try:
        from megatron.core import package_info

        return str(package_info.__version__)
    except ImportError:
        return "unknown"


def _load_dataset(recipe: Recipe, tokenizer: Any) -> SequenceDataset:
    """Local rank 0 of each node tokenizes into the cache unless it exists; the other ranks wait for the file.

    Waiting on the file rather than in a collective keeps a long tokenization clear of the process group's
    timeout. The write is atomic, so nodes sharing the cache directory may both build it safely.
    """
    path = cache_path(recipe, tokenizer)
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        build_token_cache(recipe, tokenizer)
    else:
        while not path.is_file():
            time.sleep(1.0)
    dist.barrier()
    tokens = np.load(path, mmap_mode="r")
    return SequenceDataset(tokens, recipe.data.seq_length, recipe.data.eval_fraction, recipe.seed)


class Run:
    """State of one fine-tuning run on this rank."""

    def __init__(self, recipe: Recipe, opts: RunOptions) -> None:
        from megatron.core import parallel_state as ps

        self.recipe, self.opts = recipe, opts
        self.t_start = time.perf_counter()
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.dp = recipe.resolve_world(self.world)
        self.device = resolve_device(recipe)
        self.cp_group = ps.get_context_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.grad_group = ps.get_data_parallel_group(with_context_parallel=True)
        t = recipe.train
        self.per_dp = t.global_batch // self.dp
        self.tokens_per_step = t.global_batch * recipe.data.seq_length

        _seed_everything(recipe.seed)
        self.tokenizer = build_tokenizer(recipe.tokenizer.type, recipe.tokenizer.name)
        self.vocab = recipe.padded_vocab_size(self.tokenizer.vocab_size)
        self.data = _load_dataset(recipe, self.tokenizer)
        self.model, self.core = build_model(recipe, self.vocab, self.device)
        self.named = [(n, p) for n, p in self.core.named_parameters() if p.requires_grad]
        self.num_params = count_parameters(self.core)

        self.step = 0
        self.consumed = 0
        self.resumed_from: str | None = None
        self.initialized_from: str | None = None
        resume = self._resume_path()
        if resume is None and recipe.checkpoint.pretrained:
            self._load_pretrained(Path(os.path.expanduser(recipe.checkpoint.pretrained)))
        elif resume is None:
            self._broadcast_model()
        self.opt = ShardedAdamW(self.named, self.grad_group, t)
        if resume is not None:
            self._resume(resume)

        self.is_logger = self.rank == 0
        self.out_dir = recipe.output_dir()
        self.records: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.checkpoints: list[str] = []
        if self.is_logger:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.resumed_from:  # keep the history of the run being continued
                old = read_json(self.out_dir / "metrics.json")
                self.records = [s for s in old.get("steps", []) if s.get("step", 1 << 60) < self.step]
                self.evals = [e for e in old.get("eval", []) if e.get("step", 1 << 60) <= self.step]
                self.checkpoints = list(old.get("checkpoints", []))
        self.setup_time = time.perf_counter() - self.t_start

    # ----- start: fresh, pretrained weights, or resume -----------------------------------------------------------

    def _resume_path(self) -> Path | None:
        ck = self.recipe.checkpoint
        if ck.resume == "never":
            return None
        if ck.resume == "auto":
            root = self.recipe.checkpoint_dir()
            return ckpt.find_checkpoint(root) if root.is_dir() else None
        path = Path(os.path.expanduser(ck.resume))
        found = ckpt.find_checkpoint(path) if path.exists() else None
        if found is None:
            raise RecipeError(f"{self.recipe.source}: checkpoint.resume: no checkpoint at {path}")
        return found

    def _broadcast_model(self) -> None:
        """Every rank starts from rank 0's initial weights (init is seeded; this makes it certain)."""
        if self.world > 1:
            with torch.no_grad():
                for _, p in self.named:
                    dist.broadcast(p.data, src=0)

    def _model_state(self) -> dict[str, Any]:
        return self.core.sharded_state_dict()

    def _load_pretrained(self, path: Path) -> None:
        found = ckpt.find_checkpoint(path) if path.exists() else None
        if found is None:
            raise RecipeError(f"{self.recipe.source}: checkpoint.pretrained: no checkpoint at {path}")
        loaded = ckpt.load_checkpoint(found, {"model": self._model_state()})
        self.core.load_state_dict(loaded["model"], strict=True)
        self.initialized_from = str(found)

    def _resume(self, path: Path) -> None:
        if ckpt.read_marker(path).get("format") != FORMAT:
            raise RecipeError(f"{self.recipe.source}: {path} was not written by megatron-tasp finetune, so it has no "
                              "optimizer state or data position to resume; start from its weights with "
                              "checkpoint.pretrained (and checkpoint.resume: never)")
        state = {"model": self._model_state(), "optimizer": self.opt.sharded_state_dict()}
        loaded = ckpt.load_checkpoint(path, state)
        self.core.load_state_dict(loaded["model"], strict=True)
        self.opt.load_loaded_state(loaded["optimizer"], int(loaded["optimizer_steps"]))
        self.step = int(loaded["step"])
        self.consumed = int(loaded["consumed_samples"])
        if "rng" in loaded:
            ckpt.set_rng_state(loaded["rng"])
        self.resumed_from = str(path)

    # ----- checkpoint --------------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Save model, optimizer and progress as ``iter_<step>``."""
        state: dict[str, Any] = {
            "model": self._model_state(), "optimizer": self.opt.sharded_state_dict(),
            "format": FORMAT, "step": self.step, "consumed_samples": self.consumed,
            "optimizer_steps": self.opt.steps_taken, "rng": ckpt.rng_state(), "recipe": self.recipe.to_dict(),
        }
        marker = {"format": FORMAT, "recipe": self.recipe.name, "world_size": self.world, "dp": self.dp,
                  "cp": self.recipe.parallel.cp, "tp": self.recipe.parallel.tp, "consumed_samples": self.consumed}
        path = ckpt.save_checkpoint(self.recipe.checkpoint_dir(), self.step, state, marker,
                                    self.recipe.checkpoint.keep_last, fault_hook=self.opts.fault_hook)
        self.checkpoints.append(str(path))
        return path

    # ----- training ----------------------------------------------------------------------------------------------

    def _forward_loss_sum(self, windows: np.ndarray) -> torch.Tensor:
        batch = model_inputs(windows, self.cp_group, self.device)
        per_token = self.model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                               labels=batch["labels"])
        return per_token.float().sum()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its record."""
        t = self.recipe.train
        _sync(self.device)
        t0 = time.perf_counter()
        self.model.train()
        first = self.consumed + self.dp_rank * self.per_dp
        windows = self.data.train_samples(first, self.per_dp)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in range(0, self.per_dp, t.micro_batch):
            ls = self._forward_loss_sum(windows[mb:mb + t.micro_batch])
            (ls / self.tokens_per_step).backward()
            loss_sum += ls.detach()
        if self.world > 1:
            dist.all_reduce(loss_sum, group=self.grad_group)
        self.opt.reduce_gradients()
        grad_norm = self.opt.clip_gradients()
        lr = lr_at(self.step, t)
        self.opt.step(lr)
        _sync(self.device)
        dt = time.perf_counter() - t0
        loss = float(loss_sum) / self.tokens_per_step
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {self.step + 1}; lower train.lr")
        rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
               "tokens_per_s": self.tokens_per_step / dt, "consumed_samples": self.consumed + t.global_batch}
        self.step += 1
        self.consumed += t.global_batch
        return rec

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over ``train.eval_batches`` held-out sequences (split over DP ranks)."""
        n = self.recipe.train.eval_batches
        if n <= 0:
            return None
        windows = self.data.eval_samples(n)
        if not len(windows):
            return None
        self.model.eval()
        mine = windows[self.dp_rank::self.dp]
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for i in range(0, len(mine), self.recipe.train.micro_batch):
            total += self._forward_loss_sum(mine[i:i + self.recipe.train.micro_batch])
        if self.world > 1:
            dist.all_reduce(total, group=self.grad_group)
        self.model.train()
        return float(total) / (len(windows) * self.recipe.data.seq_length)

    def _record_eval(self) -> None:
        loss = self.evaluate()
        if loss is not None:
            self.evals = [e for e in self.evals if e["step"] != self.step]
            self.evals.append({"step": self.step, "loss": loss})
            self.log.write(f"eval  after step {self.step:5d}  held-out loss {loss:.4f}")

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or ``--max-steps``); return the metrics document."""
        r, t, ck = self.recipe, self.recipe.train, self.recipe.checkpoint
        end = t.steps if self.opts.max_steps is None else min(t.steps, self.opts.max_steps)
        self.log = ProgressLog(total=t.steps, initial=self.step, interval=r.logging.interval,
                               enabled=self.is_logger and self.opts.log, bar=r.logging.progress_bar,
                               desc=f"finetune {r.name}")
        self._banner(end)
        t_loop = time.perf_counter()
        start = self.step
        try:
            if t.eval_batches and self.step == 0 and self.step < end:
                self._record_eval()
            self.log.start()
            saved_at = -1
            while self.step < end:
                rec = self.train_step()
                self.records.append(rec)
                self.log.step(rec, t.steps)
                if t.eval_batches and ((t.eval_interval and self.step % t.eval_interval == 0) or self.step == end):
                    self._record_eval()
                if ck.save and ck.interval and self.step % ck.interval == 0:
                    self.save()
                    saved_at = self.step
                    self._write_metrics(time.perf_counter() - t_loop)
            if ck.save and ck.save_at_end and saved_at != self.step and self.step > start:
                self.save()
        finally:
            self.log.close()
        doc = self._write_metrics(time.perf_counter() - t_loop, final=True)
        if self.is_logger and self.opts.log:
            self._summary(doc)
        return doc

    # ----- reporting ---------------------------------------------------------------------------------------------

    def _banner(self, end: int) -> None:
        if not self.log.enabled:
            return
        r = self.recipe
        p = r.parallel
        if self.resumed_from:
            start = f"resuming from {self.resumed_from} (step {self.step}, {self.consumed} samples consumed)"
        elif self.initialized_from:
            start = f"weights from {self.initialized_from} (optimizer and step start fresh)"
        else:
            start = "random initialisation (training from scratch)"
        if p.cp == 1:
            rings = "none"
        else:
            rings = "1 (ring)" if r.num_rings == 1 else (r.num_rings or f"{_max_rings(r)} (the most available)")
        self.log.write(
            f"[finetune] {r.name}: {self.num_params / 1e6:.2f}M params, {r.model.num_layers} layers x "
            f"{r.model.hidden_size}, vocab {self.vocab}, seq {r.data.seq_length}, global batch "
            f"{r.train.global_batch} ({self.tokens_per_step:,} tokens/step)\n"
            f"[finetune] world {self.world} = tp {p.tp} x cp {p.cp} x dp {self.dp} on {self.device.type} "
            f"({dist.get_backend()}), CP backend {p.cp_backend if p.cp > 1 else 'none (cp=1)'}, rings {rings}, "
            f"precision {r.train.precision}\n"
            f"[finetune] data: {r.data.source}, {len(self.data.tokens):,} tokens, {self.data.num_train} train / "
            f"{len(self.data.eval_windows)} held-out sequences; start: {start}\n"
            f"[finetune] steps {self.step} -> {end} of {r.train.steps}; output {self.out_dir}")
        if self.step >= end:
            self.log.write(f"[finetune] nothing to train: step {self.step} already reached (train.steps={r.train.steps}"
                           f"{'' if self.opts.max_steps is None else f', --max-steps {self.opts.max_steps}'}); "
                           "use checkpoint.resume=never or another logging.output_dir to start over")

    def _write_metrics(self, loop_time: float, final: bool = False) -> dict[str, Any]:
        r = self.recipe
        doc: dict[str, Any] = {
            "recipe": r.name, "recipe_source": r.source, "world_size": self.world, "tp": r.parallel.tp,
            "cp": r.parallel.cp, "dp": self.dp, "cp_backend": r.parallel.cp_backend, "num_rings": r.num_rings,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch_version": torch.__version__, "megatron_core_version": _mcore_version(),
            "num_params": self.num_params, "vocab_size": self.vocab, "seq_length": r.data.seq_length,
            "global_batch": r.train.global_batch, "tokens_per_step": self.tokens_per_step,
            "train_steps": r.train.steps, "end_step": self.step,
            "resumed_from": self.resumed_from, "initialized_from": self.initialized_from,
            "setup_time_s": self.setup_time, "train_time_s": loop_time, "checkpoints": self.checkpoints,
            "steps": self.records, "eval": self.evals,
        }
        doc.update(summarize(self.records, self.evals))
        if self.is_logger:
            write_json(self.out_dir / "metrics.json", doc)
            if final and r.logging.plot:
                title = (f"{r.name}: seq {r.data.seq_length}, CP={r.parallel.cp} ({r.parallel.cp_backend}), "
                         f"DP={self.dp}, {self.num_params / 1e6:.1f}M params")
                if plot_loss(self.out_dir / "loss.png", self.records, self.evals, title, math.log(self.vocab)):
                    doc["plot"] = str(self.out_dir / "loss.png")
        return doc

    def _summary(self, doc: dict[str, Any]) -> None:
        if not self.records:
            return
        n = min(10, len(self.records))
        parts = [f"train loss {doc['first_loss_mean10']:.3f} -> {doc['last_loss_mean10']:.3f} (mean of the first/last "
                 f"{n} steps; step {self.records[0]['step'] + 1}: {doc['first_loss']:.3f}, step "
                 f"{self.records[-1]['step'] + 1}: {doc['last_loss']:.3f})"]
        if "first_eval_loss" in doc:
            parts.append(f"held-out {doc['first_eval_loss']:.3f} -> {doc['last_eval_loss']:.3f}")
        parts.append(f"{doc['mean_tokens_per_s']:,.0f} tokens/s")
        self.log.write("[finetune] done: " + ", ".join(parts))
        self.log.write(f"[finetune] wrote {self.out_dir / 'metrics.json'}" +
                       (f", {doc['plot']}" if "plot" in doc else "") +
                       (f"; checkpoint {self.checkpoints[-1]}" if self.checkpoints else ""))


def run_training(recipe: Recipe, opts: RunOptions | None = None) -> dict[str, Any]:
    """Fine-tune on the initialised default process group; every rank returns the metrics document."""
    from megatron.core import parallel_state as ps

    opts = opts or RunOptions()
    recipe.resolve_world(dist.get_world_size())
    ps.initialize_model_parallel(tensor_model_parallel_size=recipe.parallel.tp,
                                 context_parallel_size=recipe.parallel.cp)
    try:
        return Run(recipe, opts).run()
    finally:
        ps.destroy_model_parallel()


__all__ = ["FORMAT", "Run", "RunOptions", "resolve_device", "run_training"]
