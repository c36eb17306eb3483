"""Gradient reduction, optimizer and learning-rate schedule of a fine-tuning run.

On GPUs these are Megatron-Core's own pieces: ``DistributedDataParallel`` (contiguous gradient buffers,
bucketed reduction over the DP x CP group), ``get_megatron_optimizer`` (AdamW on fp32 master weights with
global-norm clipping; with ``train.distributed_optimizer`` its state is sharded over DP x CP) and
``finalize_model_grads`` (reduction, then division by the global token count).

On CPU Megatron's DDP and optimizer cannot run: their buffers, kernels and communication streams are
created on the current CUDA device. :class:`CpuAdamW` is the small stand-in for that case only:
``torch.optim.AdamW`` over fp32 masters and ONE flat all-reduce of all gradients (plus the token count)
over the DP x CP group per step. Its state is stored per parameter name, so a CPU checkpoint loads at any
DP or CP size.

Both paths share one learning-rate schedule, Megatron's ``OptimizerParamScheduler`` (pure Python):
linear warmup over ``train.warmup_steps``, then cosine decay to the absolute ``train.min_lr`` at the
last step (or constant). The scheduler is advanced before each optimizer step, so step ``k`` (0-based)
uses the schedule's value at ``k + 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_tasp.apps.finetune_lib.recipe import Recipe


def wrap_model(recipe: Recipe, model: torch.nn.Module, config: Any, cuda: bool) -> torch.nn.Module:
    """On GPUs Megatron's DDP around ``model`` (gradients reduced in fp32); on CPU the model itself."""
    if not cuda:
        return model
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=recipe.train.distributed_optimizer)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(recipe: Recipe, model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]],
                    group: Any, cuda: bool) -> Any:
    """Megatron's optimizer for the DDP-wrapped ``model`` on GPUs; :class:`CpuAdamW` on CPU."""
    t = recipe.train
    if not cuda:
        return CpuAdamW(named, group, t.betas, t.eps, t.weight_decay, t.grad_clip, t.lr)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    bf16 = t.precision == "bf16"
    config = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                             adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_eps=t.eps, clip_grad=t.grad_clip,
                             bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             use_distributed_optimizer=t.distributed_optimizer)
    return get_megatron_optimizer(config, [model])


def build_scheduler(recipe: Recipe, optimizer: Any) -> Any:
    """Megatron's ``OptimizerParamScheduler`` for the recipe (recipe values win over a checkpoint's)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = recipe.train
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.steps, t.warmup_steps + 1), lr_decay_style=t.schedule, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def optimizer_step(optimizer: Any) -> float:
    """One optimizer step on reduced gradients; returns the global gradient norm before clipping."""
    if isinstance(optimizer, CpuAdamW):
        return optimizer.step()
    _, grad_norm, _ = optimizer.step()
    return float(grad_norm) if grad_norm is not None else float("nan")


def materialize_state(optimizer: Any) -> None:
    """Give every inner torch optimizer of a Megatron optimizer its state tensors before a checkpoint is
    loaded into it. Without Apex/Transformer Engine, Megatron's distributed optimizer reads the Adam step
    from the inner optimizer's state, which torch creates only at the first step, so building the
    state dict to load into fails on a fresh optimizer. One step on zero gradients creates the state; the
    load then overwrites it and the fp32 main parameters it touched."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        params = [p for group in inner.param_groups for p in group["params"] if p.numel() > 0]
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)


class CpuAdamW:
    """AdamW on fp32 masters with one flat gradient all-reduce over ``group`` (the CPU stand-in, see above).

    The same instance serves as ``config.finalize_model_grads_func`` (:meth:`finalize_grads`).
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], group: Any, betas: list[float],
                 eps: float, weight_decay: float, grad_clip: float, lr: float) -> None:
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        # fp32 parameters are their own masters; lower-precision ones get an fp32 copy.
        self.masters = [p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float())
                        for p in self.params]
        groups = [{"params": [m for m, p in zip(self.masters, self.params, strict=True) if p.dim() >= 2],
                   "wd_mult": 1.0},
                  {"params": [m for m, p in zip(self.masters, self.params, strict=True) if p.dim() < 2],
                   "wd_mult": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps,
                                     weight_decay=weight_decay, foreach=False)
        self.grad_clip = grad_clip
        self.steps_taken = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The torch optimizer's parameter groups (the scheduler sets their lr and weight decay)."""
        return self.opt.param_groups

    def zero_grad(self) -> None:
        """Drop every gradient."""
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    def finalize_grads(self, model: Any = None, num_tokens: torch.Tensor | None = None, **_: Any) -> None:
        """Sum gradients (and the token count) over the DP x CP group in one all-reduce; divide by the tokens."""
        grads = [p.grad.float() if p.grad is not None else torch.zeros(p.shape) for p in self.params]
        tokens = torch.ones(1) if num_tokens is None else num_tokens.reshape(1).float()
        flat = _flatten_dense_tensors([*grads, tokens])
        if self.world > 1:
            dist.all_reduce(flat, group=self.group)
        flat[:-1].div_(flat[-1].clamp(min=1.0))
        for m, g in zip(self.masters, _unflatten_dense_tensors(flat[:-1], grads), strict=True):
            m.grad = g.view_as(m)
        for p, m in zip(self.params, self.masters, strict=True):
            if p is not m:
                p.grad = None

    def step(self) -> float:
        """Clip by the global norm, step AdamW, copy masters back; returns the norm before clipping."""
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.masters, max_norm, foreach=False))
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                if p is not m:
                    p.copy_(m)
        self.zero_grad()
        self.steps_taken += 1
        return norm

    # ----- checkpoint state (every rank holds the full state: replica id = rank in the group) ------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, p, m in zip(self.names, self.params, self.masters, strict=True):
            st = self.opt.state[m]
            if "exp_avg" not in st:  # no step yet: zero moments make the checkpoint complete
                st.update(step=torch.tensor(float(self.steps_taken)), exp_avg=torch.zeros_like(m),
                          exp_avg_sq=torch.zeros_like(m))
            out[f"optimizer.exp_avg.{name}"] = st["exp_avg"]
            out[f"optimizer.exp_avg_sq.{name}"] = st["exp_avg_sq"]
            if p is not m:
                out[f"optimizer.master.{name}"] = m.data
        return out

    def sharded_state_dict(self, model_state: Any = None, is_loading: bool = False) -> dict[str, Any]:
        """ShardedTensors of the state (written by the group's rank 0 only)."""
        from megatron.core.dist_checkpointing import ShardedTensor

        out: dict[str, Any] = {key: ShardedTensor.from_rank_offsets(key, tensor, replica_id=self.rank)
                               for key, tensor in self._tensors().items()}
        out["steps"] = self.steps_taken
        return out

    def load_state_dict(self, loaded: dict[str, torch.Tensor]) -> None:
        """Install what ``dist_checkpointing.load`` returned for :meth:`sharded_state_dict`."""
        self.steps_taken = int(loaded["steps"])
        with torch.no_grad():
            for key, tensor in self._tensors().items():
                tensor.copy_(loaded[key])
            for p, m in zip(self.params, self.masters, strict=True):
                self.opt.state[m]["step"] = torch.tensor(float(self.steps_taken))
                if p is not m:
                    p.copy_(m)


__all__ = ["CpuAdamW", "build_optimizer", "build_scheduler", "materialize_state", "optimizer_step", "wrap_model"]
