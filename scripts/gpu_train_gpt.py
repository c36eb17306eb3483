#!/usr/bin/env python
"""Train a Megatron-Core GPT with TASP context parallelism; write per-step losses and tokens/s as JSON.

On 2x H100 (megatron-core 0.19.2; Transformer Engine not needed), the same data, seed and global batch:

    torchrun --nproc-per-node 2 scripts/gpu_train_gpt.py --cp 2 --out runs/cp2_tasp.json
    torchrun --nproc-per-node 2 scripts/gpu_train_gpt.py --cp 1 --out runs/cp1.json   # DP 2 baseline

World = CP x DP. Every step consumes ``--global-batch`` sequences of ``--seq`` byte tokens from Python's
stdlib sources (learnable text): each DP rank takes its share, each CP rank its zigzag half-chunks
(Megatron's ``get_batch_on_this_cp_rank``). The loss is normalised by the global token count and gradients
are summed over the DP x CP group, so CP=2 and CP=1 runs follow the same trajectory up to rounding.
Model: GPTModel with Megatron's local layer spec (RMSNorm, SwiGLU, RoPE, GQA) and TASP core attention
(``gpt_tasp_local_spec``; at CP 1 it is plain attention through the same kernels), bf16 weights in a
Float16Module with fp32 master weights and torch.optim.AdamW. ``--cpu-smoke`` runs tiny sizes on CPU/gloo.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # CP on Hopper: issue order = execution order

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --cpu-smoke shrinks every size for a CPU/gloo run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=2, help="context-parallel size (world must be a multiple)")
    p.add_argument("--num-rings", default=None, help="TASP rings (int or 'auto'; default: the most available)")
    p.add_argument("--transport", default=None, choices=["a2a", "p2p", "symm", "auto"])
    p.add_argument("--keep-kv", default="auto", choices=["auto", "1", "0"],
                   help="keep the forward's KV pieces for the backward (default auto: up to 64 MiB per layer)")
    p.add_argument("--kernel", default=None, help="TASP kernel backend (default: chosen at run time)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--query-groups", type=int, default=4)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--global-batch", type=int, default=2, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--data-bytes", type=int, default=48 << 20, help="bytes of stdlib source to sample from")
    p.add_argument("--out", type=str, required=True, help="JSON file written by rank 0")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU/gloo (tests)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.layers, args.hidden, args.heads, args.query_groups, args.ffn = 2, 64, 4, 2, 128
        args.seq, args.steps, args.warmup, args.data_bytes = min(args.seq, 64), min(args.steps, 4), 1, 1 << 20
    return args


# ------------------------------------------------------------------------------------------------------------
# Data: byte-level text from the Python standard library (deterministic, identical on every rank).
# ------------------------------------------------------------------------------------------------------------

def load_corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of the stdlib's .py files (sorted paths) as a uint8 tensor; a repeating pattern if none found."""
    chunks, total = [], 0
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib", "turtledemo"}
    paths = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    for path in sorted(paths):
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    if len(blob) < 1 << 16:
        blob = (b"def f(x):\n    return x * 2 + 1\n" * 4096)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def step_batch(corpus: torch.Tensor, step: int, global_batch: int, seq: int, seed: int) -> torch.Tensor:
    """``[global_batch, seq + 1]`` token windows for one step (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    starts = torch.randint(0, corpus.numel() - seq - 1, (global_batch,), generator=g)
    return torch.stack([corpus[s:s + seq + 1] for s in starts.tolist()]).long()


def cp_split(batch: dict[str, torch.Tensor], cp_group: Any) -> dict[str, torch.Tensor]:
    """Megatron's zigzag CP split (chunks r and 2cp-1-r); its signature changed in 0.17."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if cp_group is None or cp_group.size() == 1:
        return batch
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


# ------------------------------------------------------------------------------------------------------------
# Model, optimizer, training loop.
# ------------------------------------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """GPTModel with TASP core attention (local Megatron layers), wrapped in Float16Module for bf16."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_tasp.megatron.spec import gpt_tasp_local_spec
    from megatron_tasp.options import parse_options

    bf16 = args.dtype == "bf16"
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.query_groups, ffn_hidden_size=args.ffn, kv_channels=args.hidden // args.heads,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        attention_dropout=0.0, hidden_dropout=0.0, context_parallel_size=args.cp,
        cp_comm_type="tasp" if args.cp > 1 else None, bf16=bf16, params_dtype=torch.float32,
        use_cpu_initialization=True, init_method_std=0.02, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
    )
    options = parse_options({"num_rings": args.num_rings, "transport": args.transport, "keep_kv": args.keep_kv,
                             "kernel": args.kernel}, where="gpu_train_gpt.py flags")
    model = GPTModel(config=config, transformer_layer_spec=gpt_tasp_local_spec(config, options=options), vocab_size=256,
                     max_sequence_length=args.seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    model = model.to(device)
    if bf16:
        model = Float16Module(config, model)
    return model, config


def broadcast_params(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (init is seeded, this makes it certain)."""
    if dist.get_world_size() > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% over the run."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training loop on an initialised default process group; return the result record."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % args.cp:
        raise SystemExit(f"world size {world} is not a multiple of --cp {args.cp}")
    dp = world // args.cp
    if args.global_batch % dp:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of DP = {dp}")
    if args.seq % (2 * args.cp):
        raise SystemExit(f"--seq {args.seq} must be a multiple of 2 * cp = {2 * args.cp}")
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())

    parallel_state.initialize_model_parallel(context_parallel_size=args.cp)
    try:
        model_parallel_cuda_manual_seed(args.seed)
        torch.manual_seed(args.seed)
        model, _ = build_model(args, device)
        broadcast_params(model)
        params = [p for p in model.parameters() if p.requires_grad]
        master = [p.detach().float().clone().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(master, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        n_params = sum(p.numel() for p in params)

        cp_group = parallel_state.get_context_parallel_group()
        dp_rank = parallel_state.get_data_parallel_rank()
        grad_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        corpus = load_corpus(args.data_bytes)
        per_dp = args.global_batch // dp
        tokens_per_step = args.global_batch * args.seq
        positions = torch.arange(args.seq).unsqueeze(0).expand(per_dp, -1)

        steps: list[dict[str, Any]] = []
        for step in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            windows = step_batch(corpus, step, args.global_batch, args.seq, args.seed)
            mine = windows[dp_rank * per_dp:(dp_rank + 1) * per_dp]
            batch = cp_split({"tokens": mine[:, :-1].contiguous(), "labels": mine[:, 1:].contiguous(),
                              "position_ids": positions.contiguous()}, cp_group)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}

            per_token = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                              attention_mask=None, labels=batch["labels"])
            loss_sum = per_token.float().sum()
            (loss_sum / tokens_per_step).backward()

            flat = torch.cat([p.grad.float().reshape(-1) if p.grad is not None else
                              torch.zeros(p.numel(), device=device) for p in params])
            stats = torch.stack([loss_sum.detach()]).to(flat.device)
            if world > 1:
                dist.all_reduce(flat, group=grad_group)
                dist.all_reduce(stats, group=grad_group)
            offset = 0
            for p, m in zip(params, master):
                m.grad = flat[offset:offset + p.numel()].view_as(m).to(m.device)
                offset += p.numel()
                p.grad = None
            grad_norm = float(torch.nn.utils.clip_grad_norm_(master, args.clip))
            lr = lr_at(step, args)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(params, master):
                    p.copy_(m)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            loss = float(stats[0]) / tokens_per_step
            steps.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
                          "tokens_per_s": tokens_per_step / dt})
            if rank == 0:
                print(f"step {step:4d}  loss {loss:.4f}  grad_norm {grad_norm:.3f}  lr {lr:.2e}  "
                      f"{dt * 1e3:8.1f} ms  {tokens_per_step / dt:,.0f} tok/s", flush=True)
            if not math.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}")

        timed = steps[min(len(steps) - 1, max(1, args.warmup)):]
        return {
            "cp": args.cp, "dp": dp, "world_size": world, "num_params": n_params,
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch_version": torch.__version__, "megatron_core_version": _mcore_version(),
            "tokens_per_step": tokens_per_step,
            "mean_tokens_per_s": sum(s["tokens_per_s"] for s in timed) / len(timed),
            "max_memory_allocated_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None,
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"], "steps": steps,
        }
    finally:
        parallel_state.destroy_model_parallel()


def _mcore_version() -> str:
    try:
        from megatron.core import package_info

        return str(package_info.__version__)
    except ImportError:
        return "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Initialise distributed state if needed (torchrun env), train, write the JSON on rank 0."""
    if args.cpu_smoke:
        from megatron_tasp.megatron.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on GPUs, or pass --cpu-smoke for the tiny CPU/gloo check")
    if not dist.is_initialized():
        if not args.cpu_smoke:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                             ("MASTER_PORT", "29517")):
            os.environ.setdefault(key, default)
        dist.init_process_group("gloo" if args.cpu_smoke else "nccl", timeout=datetime.timedelta(minutes=10))
    elif not args.cpu_smoke:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    result = train(args)
    if dist.get_rank() == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, "
              f"{result['mean_tokens_per_s']:,.0f} tokens/s", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun."""
    run(parse_args(argv))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
