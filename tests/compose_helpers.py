"""Helpers for the composition tests: TASP inside tiny Megatron GPT models with TP / SP / recompute / MoE / DP / PP.

One worker (:func:`compose_worker`) serves every combination. It builds a GPT model from Megatron's local
layer spec (with an SP-aware LayerNorm, see :class:`SPLayerNorm`) and, under context parallelism, TASP core
attention; loads a full (TP=1, one stage) set of initial weights, shards it the way Megatron lays the
parameters out (``tensor_model_parallel`` / ``partition_dim`` attributes); runs ``steps`` training steps of
plain SGD and returns the full per-token losses and every gradient reassembled to the TP=1 shape with global
layer numbers. Gradients are reduced by hand (:func:`reduce_grads`) or, with ``opts["ddp"]``, by Megatron's
own DistributedDataParallel and ``finalize_model_grads`` (they run on CPU with one stand-in for
``torch.cuda.current_stream``); Megatron's optimizers hard-code CUDA tensors, so the update is torch's SGD.
Pipeline runs go through Megatron's ``get_forward_backward_func`` (one CPU stand-in, :class:`_CpuTorch`).
The reference (:func:`reference_run`) is the same worker on one rank: TP=1, CP=1, Megatron's own local
attention, no recompute.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tests import megatron_helpers as H

VOCAB = 128
LR = 0.5  # SGD step large enough that the second step sees visibly different weights


class SPLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm with Megatron's norm signature; its parameters carry ``sequence_parallel``.

    Megatron's local spec refuses sequence parallelism without Apex / Transformer Engine norms; the only thing
    such a norm adds is the attribute that tells the gradient reduction to sum its gradient over TP.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)


def block_spec(config: Any, *, tasp: bool, num_layers: int, options: dict[str, Any] | None = None) -> Any:
    """Local GPT block spec (MoE when config.num_moe_experts) with SPLayerNorm, TASP attention if ``tasp``
    (``options``: TASP option fields placed in the spec)."""
    from megatron.core.models.gpt import gpt_layer_specs as g
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer

    sub = g.get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False).submodules
    sub.input_layernorm = SPLayerNorm
    sub.pre_mlp_layernorm = SPLayerNorm
    layer = ModuleSpec(module=TransformerLayer, submodules=sub)
    spec = TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SPLayerNorm)
    if tasp:
        from megatron_tasp.megatron.spec import tasp_layer_spec

        spec = tasp_layer_spec(spec, **(options or {}))
    return spec


def make_batches(opts: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """One global batch per step: ``micro`` sequences per DP replica, concatenated along the batch dim."""
    rows = opts.get("micro", 2) * opts.get("dp", 1)
    return [H.make_batch(opts["seq"], batch=rows, vocab=VOCAB, seed=100 + step) for step in range(opts.get("steps", 2))]


def _global_names(model: Any) -> dict[str, str]:
    """Local parameter name -> name with global layer numbers (pipeline stages number their layers from 0)."""
    out = {}
    offsets = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
               for i, layer in enumerate(model.decoder.layers)}
    for name, _ in model.named_parameters():
        new = name
        for local, glob in offsets.items():
            if name.startswith(local):
                new = glob + name[len(local):]
                break
        out[name] = new
    return out


def _tp_info(p: torch.Tensor) -> tuple[bool, int]:
    return bool(getattr(p, "tensor_model_parallel", False)), int(getattr(p, "partition_dim", -1))


def load_full_weights(model: Any, full: dict[str, torch.Tensor], tp_group: Any) -> None:
    """Copy TP=1 weights into this rank's (possibly TP-sharded, stage-local) parameters."""
    names = _global_names(model)
    tp, rank = (tp_group.size(), tp_group.rank()) if tp_group is not None else (1, 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = full[names[name]]
            sharded, dim = _tp_info(p)
            if sharded and tp > 1:
                w = w.chunk(tp, dim=dim)[rank]
            assert w.shape == p.shape, (name, tuple(w.shape), tuple(p.shape))
            p.copy_(w)


def gather_full(model: Any, tp_group: Any, what: str = "grad") -> dict[str, torch.Tensor]:
    """Every gradient (``what="grad"``) or weight (``"weight"``) at TP=1 shape, keyed by global name: TP shards
    are concatenated along their partition dim."""
    names = _global_names(model)
    tp = tp_group.size() if tp_group is not None else 1
    out = {}
    for name, p in model.named_parameters():
        t = p if what == "weight" else (p.grad if p.grad is not None else torch.zeros_like(p))
        t = t.detach().contiguous()
        sharded, dim = _tp_info(p)
        if sharded and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t, group=tp_group)
            t = torch.cat(parts, dim=dim)
        out[names[name]] = t.clone()
    return out


def reduce_grads(model: Any, ps: Any, sp_over_tp: bool = True) -> None:
    """What Megatron's DDP + finalize_model_grads do for these models: sum over DP x CP, SP params over TP."""
    dpcp = ps.get_data_parallel_group(with_context_parallel=True)
    tp_group = ps.get_tensor_model_parallel_group()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if dpcp.size() > 1:
            dist.all_reduce(p.grad, group=dpcp)
        if sp_over_tp and getattr(p, "sequence_parallel", False) and tp_group.size() > 1:
            dist.all_reduce(p.grad, group=tp_group)


def _config(opts: dict[str, Any], cp: int, tp: int, pp: int) -> Any:
    over = dict(opts.get("config", {}))
    over.setdefault("num_layers", opts.get("num_layers", 2))
    if cp > 1:
        over.setdefault("cp_comm_type", "tasp")  # what Megatron-LM's --context-parallel-backend tasp sets
    if tp > 1:
        over.update(tensor_model_parallel_size=tp, sequence_parallel=bool(opts.get("sp", False)))
    if pp > 1:
        over.update(pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
    if cp == 1 and tp == 1:  # the reference: no recompute, Megatron's own attention
        for key in ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules"):
            over.pop(key, None)
    return H.tiny_config(cp, **over)


def _place_losses(per_token: torch.Tensor, opts: dict[str, Any], dp_rank: int, cp: int, cp_rank: int,
                  rows: int) -> torch.Tensor:
    """This rank's per-token losses [micro, s_local] placed in a zero [rows, seq] matrix."""
    micro = per_token.shape[0]
    full = torch.zeros(rows, opts["seq"])
    cols = H.zigzag_positions(cp_rank, cp, per_token.shape[1])
    full[dp_rank * micro:(dp_rank + 1) * micro][:, cols] = per_token.detach().float()
    return full


def _count_tasp_calls() -> dict[str, int]:
    """Count tasp_attention calls made in the forward and inside a backward (recompute) in this process."""
    import megatron_tasp.attention as engine

    calls = {"forward": 0, "backward": 0}
    real = engine.tasp_attention

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["backward" if torch._C._current_graph_task_id() != -1 else "forward"] += 1
        return real(*args, **kwargs)

    engine.tasp_attention = counting  # a forked rank: the parent's module is untouched
    return calls


def compose_worker(rank: int, world: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Train ``opts['steps']`` SGD steps at TP x CP x DP x PP = world; return losses/grads (see module doc)."""
    H.import_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    tp, cp, pp = opts.get("tp", 1), opts.get("cp", 1), opts.get("pp", 1)
    dp = world // (tp * cp * pp)
    assert dp == opts.get("dp", 1), (world, tp, cp, pp, opts.get("dp", 1))
    calls = _count_tasp_calls()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp)
    try:
        seed = opts.get("seed", 1234)
        model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        config = _config(opts, cp, tp, pp)
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        from megatron.core.transformer.transformer_block import get_num_layers_to_build

        spec = block_spec(config, tasp=cp > 1 or opts.get("tasp_at_cp1", False),
                          num_layers=get_num_layers_to_build(config), options=opts.get("tasp_options"))
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=opts["seq"],
                         position_embedding_type="rope", pre_process=first, post_process=last)
        tp_group = ps.get_tensor_model_parallel_group()
        if opts.get("weights") is not None:
            load_full_weights(model, opts["weights"], tp_group)
        initial = gather_full(model, tp_group, "weight") if opts.get("return_weights") else None
        cp_group = ps.get_context_parallel_group()
        dp_rank = ps.get_data_parallel_rank()
        cp_rank = ps.get_context_parallel_rank()
        micro = opts.get("micro", 2)
        rows = micro * dp
        total = rows * opts["seq"]
        runner = megatron_ddp(model, config, opts["ddp"]) if opts.get("ddp") else model
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses, grads, shards = [], [], 0
        for batch in make_batches(opts):
            mine = {k: v[dp_rank * micro:(dp_rank + 1) * micro] for k, v in batch.items()}
            local = H.cp_slice(mine, cp_group) if cp > 1 else mine
            opt.zero_grad(set_to_none=True)
            if runner is not model:
                runner.zero_grad_buffer()
            if pp > 1 or opts.get("microbatches", 1) > 1:
                per_token = _pp_step(model, local, opts["seq"], total, opts.get("microbatches", 1))
            else:
                out = runner(input_ids=local["tokens"], position_ids=local["position_ids"], attention_mask=None,
                            labels=local["labels"])
                (out.sum() / total).backward()
                per_token = out
            if runner is model:
                reduce_grads(model, ps, sp_over_tp=not opts.get("skip_sp_reduce", False))
            else:
                shards = ddp_reduce(runner)
            placed = (_place_losses(per_token, opts, dp_rank, cp, cp_rank, rows) if per_token is not None
                      else torch.zeros(rows, opts["seq"]))
            if world > 1:
                dist.all_reduce(placed, group=ps.get_data_parallel_group(with_context_parallel=True))
            losses.append(placed)
            grads.append(gather_full(model, tp_group))
            opt.step()
        leader = ps.get_tensor_model_parallel_rank() == 0 and cp_rank == 0 and dp_rank == 0
        return {"losses": losses if leader and last else None, "grads": grads if leader else None,
                "weights": initial, "stage": ps.get_pipeline_model_parallel_rank(), "shards": shards,
                "tasp_calls": dict(calls), "sp_params": sum(bool(getattr(p, "sequence_parallel", False))
                                                            for p in model.parameters()),
                "core_attention": sorted({type(m.self_attention.core_attention).__name__
                                          for m in model.decoder.layers})}
    finally:
        ps.destroy_model_parallel()


class _NoStream:
    """Stand-in for ``torch.cuda.current_stream()`` on a CPU rank: Megatron 0.19.2's gradient sync calls it
    unconditionally, then waits on the events of CUDA-graph replays (there are none here)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        raise AssertionError("no CUDA events on a CPU rank")


def megatron_ddp(model: Any, config: Any, mode: str) -> Any:
    """Wrap in Megatron's DistributedDataParallel (CPU works with the shims); ``mode`` "allreduce" or "distopt".

    ``calculate_per_token_loss`` makes DDP sum gradients (no 1/DP scaling), matching the summed loss here.
    With "distopt" DDP reduce-scatters each bucket as for the distributed optimizer (each DP x CP rank keeps
    its shard); :func:`ddp_reduce` gathers the shards back so every gradient can be compared.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if not torch.cuda.is_available():  # the gradient sync asks for the current CUDA stream (to wait on none)
        torch.cuda.current_stream = _NoStream
    assert mode in ("allreduce", "distopt"), mode
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=mode == "distopt")
    return DistributedDataParallel(config, ddp_config, model)


def ddp_reduce(ddp: Any) -> int:
    """Megatron's own gradient finalization (DP x CP reduction, SP norms over TP), then p.grad = main_grad.

    Returns the largest number of shards a bucket was reduce-scattered into (1 without the distributed
    optimizer's layout).
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    finalize_model_grads([ddp])
    most = 1
    if ddp.ddp_config.use_distributed_optimizer:
        for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            size = group.intra_distributed_optimizer_instance_size
            most = max(most, size)
            if size == 1:
                continue
            for bucket in group.buckets:
                shards = shard_buffer(bucket.grad_data, size)
                mine = shards[group.intra_distributed_optimizer_instance_rank].clone()
                dist.all_gather(shards, mine, group=group.intra_distributed_optimizer_instance_group)
    for p in ddp.module.parameters():
        p.grad = p.main_grad
    return most


class _CpuTorch:
    """``torch`` as seen by megatron.core.pipeline_parallel.schedules, with ``device="cuda"`` mapped to the CPU.

    Megatron-Core 0.19.2's pipeline schedules create their token counter with a hard-coded
    ``torch.zeros([], dtype=torch.int, device="cuda")``; that is the only CUDA-only line on this CPU path.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")) == "cuda":
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def _cpu_schedules() -> None:
    """Install :class:`_CpuTorch` in Megatron's schedules module (call in a forked rank only)."""
    if torch.cuda.is_available():
        return
    from megatron.core.pipeline_parallel import schedules

    if not isinstance(schedules.torch, _CpuTorch):
        schedules.torch = _CpuTorch()


def _pp_step(model: Any, local: dict[str, torch.Tensor], seq: int, total: int, microbatches: int = 1
             ) -> torch.Tensor | None:
    """One step through Megatron's pipeline schedule (``local`` split into ``microbatches`` along the batch);
    returns the last stage's per-token loss [rows, s_local] (None on other stages).

    With two stages and two micro-batches the 1F1B schedule has a second forward in flight before the
    first backward, so two TASP graphs (with their kept KV) are alive at once.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured: list[torch.Tensor] = []
    cp = ps.get_context_parallel_world_size()
    rows = local["tokens"].shape[0]
    assert rows % microbatches == 0, (rows, microbatches)
    size = rows // microbatches
    parts = [{k: v[i * size:(i + 1) * size] for k, v in local.items()} for i in range(microbatches)]

    def forward_step(data_iterator: Any, model_chunk: Any) -> tuple[torch.Tensor, Any]:
        data = next(data_iterator)
        out = model_chunk(input_ids=data["tokens"], position_ids=data["position_ids"], attention_mask=None,
                          labels=data["labels"])

        def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict]:
            captured.append(output.detach())
            # the schedule multiplies a (loss, dict) result by the CP size and divides it by the number of
            # micro-batches (it expects DDP to average over DP x CP); gradients here are sums: undo both
            return output.sum() * microbatches / (total * cp), {}

        return out, loss_func

    _cpu_schedules()
    model.config.batch_p2p_comm = False  # gloo: plain isend/irecv (the batched path calls torch.cuda.synchronize)
    fb = get_forward_backward_func()
    fb(forward_step_func=forward_step, data_iterator=iter(parts), model=[model], num_microbatches=microbatches,
       seq_length=seq, micro_batch_size=size, forward_only=False)
    return torch.cat(captured, dim=0) if captured else None


def run(opts: dict[str, Any], world: int, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """compose_worker on ``world`` forked gloo ranks."""
    from megatron_tasp.launch import run_workers

    return run_workers(compose_worker, world, opts, timeout_s=timeout_s)


def reference_run(opts: dict[str, Any]) -> dict[str, Any]:
    """The single-rank reference (TP=1, CP=1, Megatron's local attention) with its initial weights."""
    ref_opts = {k: v for k, v in opts.items() if k not in ("tp", "cp", "pp", "sp", "weights")}
    ref_opts.update(dp=1, micro=opts.get("micro", 2) * opts.get("dp", 1), return_weights=True)
    return run(ref_opts, 1)[0]


def merge_stage_grads(results: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Union of the gradient dicts returned by each pipeline stage's leader, per step."""
    steps: list[dict[str, torch.Tensor]] = []
    for res in results:
        if res["grads"] is None:
            continue
        for i, g in enumerate(res["grads"]):
            if len(steps) <= i:
                steps.append({})
            for name, t in g.items():
                assert name not in steps[i] or name.startswith("embedding"), name
                steps[i].setdefault(name, t)
    return steps


def compare(results: list[dict[str, Any]], ref: dict[str, Any]) -> dict[str, float]:
    """Max relative errors of losses and gradients over all steps: |a - b|.max() / max(1e-3, |b|.max())."""
    losses = next(r["losses"] for r in results if r["losses"] is not None)
    loss_err = max(float((a - b).abs().max()) / max(1e-3, float(b.abs().max()))
                   for a, b in zip(losses, ref["losses"], strict=True))
    grads = merge_stage_grads(results)
    assert len(grads) == len(ref["grads"])
    worst, where = 0.0, ""
    for got, want in zip(grads, ref["grads"], strict=True):
        err, name = H.max_grad_error(got, want)
        if err > worst:
            worst, where = err, name
    return {"loss": loss_err, "grad": worst, "where": where}  # type: ignore[dict-item]

