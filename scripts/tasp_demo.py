"""Minimal TASP attention demo: exact CP attention vs one-device attention, forward and backward.

Runs on CPU (gloo) or GPUs (NCCL), one process per CP rank:

    torchrun --nproc-per-node 4 scripts/tasp_demo.py            # CPU, 4 ranks, 2 rings (K_4* has no more)
    torchrun --nproc-per-node 8 scripts/tasp_demo.py --cuda     # 8 GPUs, 7 rings
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from megatron_tasp import hamiltonian_rings, tasp_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true", help="use NCCL and one GPU per rank")
    ap.add_argument("--tokens-per-rank", type=int, default=256)
    args = ap.parse_args()
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.cuda else torch.device("cpu")
    dtype = torch.bfloat16 if args.cuda else torch.float32
    if args.cuda:
        torch.cuda.set_device(device)

    # The same global batch on every rank: [seq, batch, heads, head_dim] (Megatron's sbhd), GQA 8/2.
    seq = args.tokens_per_rank * n
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seq, 1, h, 64, generator=gen).to(device, dtype) for h in (8, 2, 2))

    # Megatron's causal zigzag shard: rank r holds blocks r and 2n-1-r of 2n equal blocks.
    blk = seq // (2 * n)
    idx = torch.cat([torch.arange(rank * blk, (rank + 1) * blk),
                     torch.arange((2 * n - 1 - rank) * blk, (2 * n - rank) * blk)]).to(device)
    ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))

    out = tasp_attention(ql, kl, vl, dist.group.WORLD, causal=True)  # all orthogonal rings of K_n*
    out.sum().backward()

    # Reference: plain attention over the whole sequence on this rank.
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = tasp_attention(qr, kr, vr, None, causal=True)  # cp_group None = one device
    ref.sum().backward()
    err = (out.float() - ref[idx].float()).abs().max().item()
    gerr = (kl.grad.float() - kr.grad[idx].float()).abs().max().item()
    if rank == 0:
        print(f"CP={n} with {len(hamiltonian_rings(n))} ring(s): max |out - ref| = {err:.2e}, "
              f"max |dK - ref| = {gerr:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
