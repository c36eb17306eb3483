"""The fine-tuning loop on an initialised default process group (one process per rank, CPU/gloo or GPU/NCCL).

Per step: each DP rank takes its share of ``train.global_batch`` sequences in micro-batches, each CP rank
its part of them: of packed documents (the default) the THD chunks r and 2cp-1-r of every document, with
Megatron's ``PackedSeqParams``; of windows its zigzag half-chunks (Megatron's ``get_batch_on_this_cp_rank``).
The micro-batch loop is Megatron's ``get_forward_backward_func()`` on GPUs; each micro-batch returns its loss
summed over the tokens its loss mask keeps and their count, so after the gradient reduction (:mod:`.optimizer`)
the loss is the mean over all trained tokens of the global batch. Then the learning-rate schedule advances
and the optimizer steps. Evaluations (held-out loss overall and by position, :mod:`.evaluation`; passkey
retrieval, :mod:`.passkey`), checkpoints, metrics.json, loss.png and long_context.png follow the recipe. Step N
always means "after N optimizer steps" (train records, evaluations, checkpoints). On SIGINT/SIGTERM the ranks
agree to stop at the next step boundary and save a normal checkpoint there (:mod:`.stopping`).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_tasp.apps.finetune_lib import checkpoint as ckpt
from megatron_tasp.apps.finetune_lib import report
from megatron_tasp.apps.finetune_lib.data import build_token_cache, cache_path, model_inputs, open_dataset
from megatron_tasp.apps.finetune_lib.eval_report import eval_line
from megatron_tasp.apps.finetune_lib.evaluation import heldout_loss, position_edges
from megatron_tasp.apps.finetune_lib.metrics import ProgressLog, read_json
from megatron_tasp.apps.finetune_lib.model import build_model, count_parameters, transformer_config
from megatron_tasp.apps.finetune_lib.optimizer import (
    CpuAdamW,
    build_optimizer,
    build_scheduler,
    materialize_state,
    optimizer_step,
    wrap_model,
)
from megatron_tasp.apps.finetune_lib.passkey import build_prompts, score_passkeys
from megatron_tasp.apps.finetune_lib.recipe import Recipe, RecipeError
from megatron_tasp.apps.finetune_lib.stopping import StopRequest
from megatron_tasp.apps.finetune_lib.tokenizer import build_tokenizer

FORMAT = "megatron-tasp-finetune/2"  # /2: Megatron's optimizer state (GPU) or CpuAdamW's, and the LR scheduler


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


def _load_dataset(recipe: Recipe, tokenizer: Any, vocab_size: int) -> Any:
    """Local rank 0 of each node tokenizes into the cache unless it exists; the other ranks wait for the file.

    Waiting on the file rather than in a collective keeps a long tokenization clear of the process group's
    timeout. The write is atomic, so nodes sharing the cache directory may both build it safely. Indexed
    datasets are read in place.
    """
    if recipe.data.source != "indexed":
        path = cache_path(recipe, tokenizer)
        if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
            build_token_cache(recipe, tokenizer)
        else:
            while not path.is_file():
                time.sleep(1.0)
    dist.barrier()
    return open_dataset(recipe, tokenizer, vocab_size)


class Run:
    """State of one fine-tuning run on this rank."""

    def __init__(self, recipe: Recipe, opts: RunOptions, stop: StopRequest | None = None) -> None:
        from megatron.core import parallel_state as ps

        self.recipe, self.opts = recipe, opts
        self.stop = stop or StopRequest()
        self.stopped_by = 0  # the signal the ranks stopped on (0: ran to the end)
        self.t_start = time.perf_counter()
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.dp = recipe.resolve_world(self.world)
        self.device = resolve_device(recipe)
        self.cuda = self.device.type == "cuda"
        self.options = recipe.tasp_options()
        self.cp_group = ps.get_context_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.grad_group = ps.get_data_parallel_group(with_context_parallel=True)
        t = recipe.train
        self.per_dp = t.global_batch // self.dp
        self.tokens_per_step = t.global_batch * recipe.data.seq_length

        _seed_everything(recipe.seed)
        self.tokenizer = build_tokenizer(recipe.tokenizer.type, recipe.tokenizer.name)
        self.vocab = recipe.padded_vocab_size(self.tokenizer.vocab_size)
        self.data = _load_dataset(recipe, self.tokenizer, self.vocab)
        self._setup_evaluation()
        config = transformer_config(recipe, self.device)
        model, self.core = build_model(recipe, config, self.vocab, self.device)
        named = [(n, p) for n, p in self.core.named_parameters() if p.requires_grad]
        self.num_params = count_parameters(self.core)

        self.step = 0
        self.consumed = 0
        self.resumed_from: str | None = None
        self.initialized_from: str | None = None
        resume = self._resume_path()
        if resume is None and recipe.checkpoint.pretrained:
            self._load_pretrained(recipe.checkpoint.pretrained)
        elif resume is None:
            self._broadcast_model(named)
        self.model = wrap_model(recipe, model, config, self.cuda)
        self.opt = build_optimizer(recipe, self.model, named, self.grad_group, self.cuda)
        self.sched = build_scheduler(recipe, self.opt)
        if self.cuda:
            from megatron.core.distributed import finalize_model_grads

            config.finalize_model_grads_func = finalize_model_grads
            config.no_sync_func = self.model.no_sync
        else:
            config.finalize_model_grads_func = self.opt.finalize_grads
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
                self.records = [s for s in old.get("steps", []) if s.get("step", 1 << 60) <= self.step]
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

    def _broadcast_model(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Every rank starts from rank 0's initial weights (init is seeded; this makes it certain)."""
        if self.world > 1:
            with torch.no_grad():
                for _, p in named:
                    dist.broadcast(p.data, src=0)

    def _load_pretrained(self, pretrained: str) -> None:
        pretrained = os.path.expanduser(os.path.expandvars(pretrained))  # $MEGATRON_TASP_PRETRAINED in recipes
        if pretrained.startswith("hf:"):  # a Hugging Face directory, converted on the fly
            from megatron_tasp.apps.hf.start import load_pretrained_hf

            self.initialized_from = load_pretrained_hf(self)
            return
        path = Path(pretrained)
        found = ckpt.find_checkpoint(path) if path.exists() else None
        if found is None:
            raise RecipeError(f"{self.recipe.source}: checkpoint.pretrained: no checkpoint at {path}")
        loaded = ckpt.load_checkpoint(found, {"model": self.core.sharded_state_dict()})
        self.core.load_state_dict(loaded["model"], strict=True)
        self.initialized_from = str(found)

    def _state(self, is_loading: bool) -> dict[str, Any]:
        model_state = self.core.sharded_state_dict()
        if isinstance(self.opt, CpuAdamW):
            opt_state = self.opt.sharded_state_dict()
        else:
            if is_loading:
                materialize_state(self.opt)
            # 'dp_reshardable' (Megatron-LM's default): megatron-core 0.19's default format (flattened ranges) is
            # rejected by its own checkpoint validation, and its 'fully_reshardable' loader expects no Adam step
            # tensor, which torch's AdamW (used without Apex/Transformer Engine) keeps per parameter. The
            # optimizer state then resumes at the same TP x CP layout (DP may change); weights load anywhere.
            opt_state = self.opt.sharded_state_dict(model_state, is_loading=is_loading,
                                                    metadata={"distrib_optim_sharding_type": "dp_reshardable"})
        return {"model": model_state, "optimizer": opt_state}

    def _resume(self, path: Path) -> None:
        fmt = ckpt.read_marker(path).get("format")
        if fmt != FORMAT:
            hint = "it was written by an older megatron-tasp finetune" if str(fmt).startswith("megatron-tasp") \
                else "it was not written by megatron-tasp finetune, so it has no optimizer state or data position"
            raise RecipeError(f"{self.recipe.source}: cannot resume from {path}: {hint}; start from its weights "
                              "with checkpoint.pretrained (and checkpoint.resume: never)")
        loaded = ckpt.load_checkpoint(path, self._state(is_loading=True))
        self.core.load_state_dict(loaded["model"], strict=True)
        self.opt.load_state_dict(loaded["optimizer"])
        self.sched.load_state_dict(loaded["scheduler"])
        self.step = int(loaded["step"])
        self.consumed = int(loaded["consumed_samples"])
        if "rng" in loaded:
            ckpt.set_rng_state(loaded["rng"])
        self.resumed_from = str(path)

    # ----- checkpoint --------------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Save model, optimizer, schedule and progress as ``iter_<step>``."""
        state = self._state(is_loading=False)
        state.update(format=FORMAT, step=self.step, consumed_samples=self.consumed,
                     scheduler=self.sched.state_dict(), rng=ckpt.rng_state(), recipe=self.recipe.to_dict())
        marker = {"format": FORMAT, "recipe": self.recipe.name, "world_size": self.world, "dp": self.dp,
                  "cp": self.recipe.parallel.cp, "tp": self.recipe.parallel.tp, "consumed_samples": self.consumed}
        path = ckpt.save_checkpoint(self.recipe.checkpoint_dir(), self.step, state, marker,
                                    self.recipe.checkpoint.keep_last, fault_hook=self.opts.fault_hook)
        self.checkpoints.append(str(path))
        return path

    # ----- training ----------------------------------------------------------------------------------------------

    def _forward_step(self, data_iterator: Iterator[Any], model: torch.nn.Module) -> tuple[Any, Callable]:
        """Megatron's forward-step contract: the output and a loss function returning (sum, tokens, report)."""
        batch = model_inputs(next(data_iterator), self.cp_group, self.device)
        per_token = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                          labels=batch["labels"], packed_seq_params=batch.get("packed_seq_params"))
        mask = batch.get("loss_mask")  # packed documents: 0 on padding (and SFT prompts)

        def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
            if mask is None:
                loss_sum = output.float().sum()
                tokens = torch.tensor(output.numel(), dtype=torch.int, device=output.device)
            else:
                loss_sum = (output.float() * mask).sum()
                tokens = mask.sum().to(torch.int)
            return loss_sum, tokens, {"loss_sum": loss_sum.detach(), "tokens": tokens.detach()}

        return per_token, loss_func

    def _forward_backward(self, windows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Every micro-batch's forward and backward, then the gradient reduction; returns this rank's loss sum
        and trained-token count."""
        mb = self.recipe.train.micro_batch
        batches = iter([windows[i:i + mb] for i in range(0, len(windows), mb)])
        n = len(windows) // mb
        if self.cuda:  # Megatron's schedule (it allocates its token counter on the CUDA device)
            from megatron.core.pipeline_parallel import get_forward_backward_func

            reports = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=batches, model=[self.model], num_microbatches=n,
                seq_length=self.recipe.data.seq_length, micro_batch_size=mb, forward_only=False)
            return (torch.stack([r["loss_sum"] for r in reports]).sum(),
                    torch.stack([r["tokens"] for r in reports]).sum())
        loss_sum, tokens = torch.zeros(()), torch.zeros((), dtype=torch.int)
        for _ in range(n):  # the same contract on CPU, without the CUDA-only schedule
            output, loss_func = self._forward_step(batches, self.model)
            loss, count, rep = loss_func(output)
            loss.backward()
            loss_sum, tokens = loss_sum + rep["loss_sum"], tokens + count
        self.opt.finalize_grads([self.model], tokens)
        return loss_sum, tokens

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its record."""
        t = self.recipe.train
        _sync(self.device)
        t0 = time.perf_counter()
        self.model.train()
        if self.cuda:
            self.model.zero_grad_buffer()
        self.opt.zero_grad()
        first = self.consumed + self.dp_rank * self.per_dp
        loss_sum, tokens = self._forward_backward(self.data.train_samples(first, self.per_dp))
        totals = torch.stack([loss_sum.to(torch.float64), tokens.to(torch.float64)])
        if self.world > 1:
            dist.all_reduce(totals, group=self.grad_group)
        self.sched.step(1)
        lr = float(self.opt.param_groups[0]["lr"])
        grad_norm = optimizer_step(self.opt)
        _sync(self.device)
        dt = time.perf_counter() - t0
        loss = float(totals[0]) / max(float(totals[1]), 1.0)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {self.step + 1}; lower train.lr")
        self.step += 1
        self.consumed += t.global_batch
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
                "tokens_per_s": self.tokens_per_step / dt, "consumed_samples": self.consumed}

    # ----- evaluation: held-out loss (overall and by position), passkey retrieval ------------------------------

    def _setup_evaluation(self) -> None:
        """Position buckets and passkey prompts (built now, so a prompt that does not fit fails before training)."""
        r, t = self.recipe, self.recipe.train
        s = r.data.seq_length
        self.eval_edges = position_edges(s, t.eval_position_buckets, t.eval_position_spacing) \
            if t.eval_position_buckets else [0, s]
        pk = r.passkey
        try:
            self.passkey_prompts = build_prompts(self.tokenizer, pk.lengths, pk.depths, pk.trials, r.seed) \
                if pk.lengths else []
        except ValueError as exc:
            raise RecipeError(f"{r.source}: {exc}") from None
        self.evaluating = t.eval_batches > 0 or bool(self.passkey_prompts)

    def _per_token_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                          labels=batch["labels"], packed_seq_params=batch.get("packed_seq_params"))

    def _logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Held-out loss over ``train.eval_batches`` sequences (split over DP ranks), overall and by position
        bucket, and the passkey check; None when neither is configured."""
        t = self.recipe.train
        windows = self.data.eval_samples(t.eval_batches) if t.eval_batches > 0 else []
        if not len(windows) and not self.passkey_prompts:
            return None
        self.model.eval()
        out: dict[str, Any] = {}
        try:
            if len(windows):
                mine, mb = windows[self.dp_rank::self.dp], t.micro_batch
                batches = (model_inputs(mine[i:i + mb], self.cp_group, self.device) for i in range(0, len(mine), mb))
                out.update(heldout_loss(self._per_token_loss, batches, self.eval_edges, self.cp_group,
                                        self.grad_group, self.device, t.eval_position_view))
            if self.passkey_prompts:
                t0 = time.perf_counter()
                out["passkey"] = score_passkeys(self._logits, self.passkey_prompts, cp_group=self.cp_group,
                                                reduce_group=self.grad_group, dp_rank=self.dp_rank, dp=self.dp,
                                                micro_batch=t.micro_batch, device=self.device,
                                                vocab_limit=self.tokenizer.vocab_size)
                _sync(self.device)
                out["passkey"]["time_s"] = time.perf_counter() - t0
        finally:
            self.model.train()
        return out

    def _record_eval(self) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        result = self.evaluate()
        if result is not None:
            _sync(self.device)
            result["time_s"] = time.perf_counter() - t0
            self.evals = [e for e in self.evals if e["step"] != self.step]
            self.evals.append({"step": self.step, **result})
            self.log.write(eval_line(self.step, result))

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or ``--max-steps``); return the metrics document."""
        r, t, ck = self.recipe, self.recipe.train, self.recipe.checkpoint
        end = t.steps if self.opts.max_steps is None else min(t.steps, self.opts.max_steps)
        self.log = ProgressLog(total=t.steps, initial=self.step, interval=r.logging.interval,
                               enabled=self.is_logger and self.opts.log, bar=r.logging.progress_bar,
                               desc=f"finetune {r.name}")
        report.banner(self, end)
        t_loop = time.perf_counter()
        start = self.step
        try:
            if self.evaluating and self.step == 0 and self.step < end:
                self._record_eval()
            self.log.start()
            saved_at = -1
            while self.step < end:
                self.stopped_by = self.stop.agreed(self.device)  # every rank stops after the same step
                if self.stopped_by:
                    break
                rec = self.train_step()
                self.records.append(rec)
                self.log.step(rec, t.steps)
                if self.evaluating and ((t.eval_interval and self.step % t.eval_interval == 0) or self.step == end):
                    self._record_eval()
                if ck.save and ck.interval and self.step % ck.interval == 0:
                    self.save()
                    saved_at = self.step
                    report.write_metrics(self, time.perf_counter() - t_loop)
            if ck.save and (ck.save_at_end or self.stopped_by) and saved_at != self.step and self.step > start:
                self.save()
            if ck.export_hf and not self.stopped_by:
                from megatron_tasp.apps.hf.start import export_after_run

                export_after_run(self)
        finally:
            self.log.close()
        doc = report.write_metrics(self, time.perf_counter() - t_loop, final=True)
        if self.is_logger and self.opts.log:
            report.summary(self, doc)
        return doc


def run_training(recipe: Recipe, opts: RunOptions | None = None) -> dict[str, Any]:
    """Fine-tune on the initialised default process group; every rank returns the metrics document."""
    from megatron.core import parallel_state as ps

    opts = opts or RunOptions()
    with StopRequest() as stop:
        recipe.resolve_world(dist.get_world_size())
        ps.initialize_model_parallel(tensor_model_parallel_size=recipe.parallel.tp,
                                     context_parallel_size=recipe.parallel.cp)
        try:
            return Run(recipe, opts, stop).run()
        finally:
            ps.destroy_model_parallel()


__all__ = ["FORMAT", "Run", "RunOptions", "resolve_device", "run_training"]
