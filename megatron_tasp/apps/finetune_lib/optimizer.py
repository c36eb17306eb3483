"""AdamW with fp32 master weights sharded over the data x context-parallel ranks, and the LR schedule.

With TP = 1 every model parameter is replicated on all ``dp * cp`` ranks, and so would be its fp32
master copy and the two AdamW moments (12 bytes per parameter: 96 GB for an 8B model). Here each
parameter has one *owner* rank in the DP x CP group (greedy balance by size, deterministic):

1. after backward, each parameter's gradient is summed onto its owner (``reduce`` in fp32);
2. the owners clip by the global norm (one all-reduce of squared norms) and step AdamW on their fp32
   masters;
3. each owner broadcasts the updated weights (in the model's dtype) to the other ranks.

This moves the same bytes as reduce-scatter + all-gather, and optimizer memory per rank is
``12 * params / (dp * cp)`` bytes. The state is stored in checkpoints per parameter name (``optimizer.
master.<name>`` etc., saved by the owner only), so a checkpoint loads at any DP or CP size. It is our own,
deliberately small scheme; it works the same on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.apps.finetune_lib.recipe import TrainSection


def lr_at(step: int, t: TrainSection) -> float:
    """Learning rate for 0-based ``step``: linear warmup to ``lr``, then cosine decay to ``min_lr`` (or flat)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    frac = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least-loaded rank (ties: lowest rank)."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        r = min(range(world), key=lambda k: (load[k], k))
        owners[i] = r
        load[r] += sizes[i]
    return owners


class ShardedAdamW:
    """AdamW over fp32 masters owned by one rank each of ``group`` (see the module docstring)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], group: Any, t: TrainSection) -> None:
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.owners = assign_owners([p.numel() for p in self.params], self.world)
        self.owner_global = [dist.get_global_rank(group, o) if group is not None and self.world > 1 else o
                             for o in self.owners]
        self.mine = [i for i, o in enumerate(self.owners) if o == self.rank]
        self.master: dict[int, torch.nn.Parameter] = {}
        for i in self.mine:
            p = self.params[i]
            self.master[i] = torch.nn.Parameter(p.detach().to(torch.float32, copy=True))
        decay = [self.master[i] for i in self.mine if self.params[i].dim() >= 2]
        no_decay = [self.master[i] for i in self.mine if self.params[i].dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, foreach=False) \
            if groups else None
        self.grad_clip = t.grad_clip
        self.steps_taken = 0

    # ----- one optimizer step --------------------------------------------------------------------------------

    def reduce_gradients(self) -> None:
        """Sum every parameter's gradient over the group onto its owner (fp32), then drop the model grads."""
        for i, p in enumerate(self.params):
            g = p.grad
            g = torch.zeros(p.shape, dtype=torch.float32, device=p.device) if g is None else \
                g.detach().to(torch.float32, copy=True)
            if self.world > 1:
                dist.reduce(g, dst=self.owner_global[i], group=self.group)
            if i in self.master:
                self.master[i].grad = g
            p.grad = None

    def clip_gradients(self) -> float:
        """Clip the owners' gradients to ``grad_clip`` by the global norm; return the norm before clipping."""
        device = self.params[0].device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for m in self.master.values():
            if m.grad is not None:
                sq += m.grad.pow(2).sum()
        if self.world > 1:
            dist.all_reduce(sq, group=self.group)
        norm = float(sq.sqrt())
        if self.grad_clip > 0 and math.isfinite(norm) and norm > self.grad_clip:
            scale = self.grad_clip / (norm + 1e-6)
            for m in self.master.values():
                if m.grad is not None:
                    m.grad.mul_(scale)
        return norm

    def step(self, lr: float) -> None:
        """AdamW on the owned masters, then every owner broadcasts its updated weights."""
        if self.opt is not None:
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.steps_taken += 1
        self.sync_params()

    @torch.no_grad()
    def sync_params(self) -> None:
        """Copy owned masters into the model and broadcast each parameter from its owner."""
        for i, p in enumerate(self.params):
            if i in self.master:
                p.copy_(self.master[i])
            if self.world > 1:
                dist.broadcast(p.data, src=self.owner_global[i], group=self.group)

    # ----- checkpoint state ------------------------------------------------------------------------------------

    def _state_tensors(self, i: int) -> dict[str, torch.Tensor]:
        m = self.master[i]
        st = self.opt.state.get(m, {}) if self.opt is not None else {}
        if "exp_avg" not in st:  # no step yet: materialise zero moments so the checkpoint is complete
            st["exp_avg"] = torch.zeros_like(m)
            st["exp_avg_sq"] = torch.zeros_like(m)
            st["step"] = torch.tensor(float(self.steps_taken))
            if self.opt is not None:
                self.opt.state[m] = st
        return {"master": m.data, "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}

    def sharded_state_dict(self) -> dict[str, Any]:
        """ShardedTensors of the owned state (``optimizer.<kind>.<param name>``, replica 0 on the owner)."""
        from megatron.core.dist_checkpointing import ShardedTensor

        out: dict[str, Any] = {}
        for i in self.mine:
            for kind, tensor in self._state_tensors(i).items():
                key = f"optimizer.{kind}.{self.names[i]}"
                out[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
        return out

    def load_loaded_state(self, loaded: dict[str, torch.Tensor], steps_taken: int) -> None:
        """Install tensors returned by ``dist_checkpointing.load`` for :meth:`sharded_state_dict`'s keys."""
        self.steps_taken = int(steps_taken)
        for i in self.mine:
            m = self.master[i]
            prefix = f"optimizer.{{}}.{self.names[i]}"
            with torch.no_grad():
                m.copy_(loaded[prefix.format("master")])
            if self.opt is not None:
                self.opt.state[m] = {
                    "step": torch.tensor(float(steps_taken)),
                    "exp_avg": loaded[prefix.format("exp_avg")].to(m.device, torch.float32).clone(),
                    "exp_avg_sq": loaded[prefix.format("exp_avg_sq")].to(m.device, torch.float32).clone(),
                }
        self.sync_params()

    def reset_masters_from_model(self) -> None:
        """After loading model weights only: masters := model weights, moments cleared."""
        with torch.no_grad():
            for i in self.mine:
                self.master[i].copy_(self.params[i].detach().float())
        if self.opt is not None:
            self.opt.state.clear()
        self.steps_taken = 0


__all__ = ["ShardedAdamW", "assign_owners", "lr_at"]
