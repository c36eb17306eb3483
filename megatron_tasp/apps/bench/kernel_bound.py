"""``kernel_bound``: the block kernels of one TASP call and nothing else.

The chosen block kernel runs plainly on the block work one rank does in TASP at that CP size (one ring,
Megatron's zigzag split when causal), on contiguous ``[b, h, s, d]`` tensors: no merge, no engine, no
communication. Time per rank, max over ranks, so TASP time / kernel_bound time is what the engine adds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Block", "block_work", "kernel_bound_fn"]


class Block(NamedTuple):
    """One kernel call: queries [q_start, q_start + q_len) x keys [0, kv_len) of the local tokens."""

    q_start: int
    q_len: int
    kv_len: int
    causal: bool


def block_work(tokens: int, n: int, rank: int, causal: bool) -> list[Block]:
    """The blocks ``rank`` computes in one TASP call at CP = ``n`` with ``tokens`` local tokens.

    Causal (zigzag): the own tokens as one causal block, then one block per other rank: all queries x the
    front half of an earlier rank's tokens, or the back half of the queries x all of a later rank's
    tokens (CP = 2: causal tok x tok plus one full tok/2 x tok). No mask: n full tok x tok blocks.
    """
    if not causal:
        return [Block(0, tokens, tokens, False)] * n
    half = tokens // 2
    return ([Block(0, tokens, tokens, True)] + [Block(0, tokens, half, False)] * rank
            + [Block(half, half, tokens, False)] * (n - 1 - rank))


def kernel_bound_fn(kernel: Any, q, k, v, dout, blocks: list[Block], passes: str, scale: float) -> Callable[[], None]:
    """A callable running ``blocks`` with ``kernel`` (forward, or forward then backward per block) on
    contiguous bhsd copies of the local ``q``/``k``/``v``/``dout`` (``[b, h, s, d]``), prepared once."""
    import torch

    work = []
    for blk in blocks:
        qs = q[:, :, blk.q_start:blk.q_start + blk.q_len].contiguous()
        ks, vs = (x[:, :, :blk.kv_len].contiguous() for x in (k, v))
        work.append((qs, ks, vs, dout[:, :, blk.q_start:blk.q_start + blk.q_len].contiguous(), blk.causal))

    def run() -> None:
        with torch.no_grad():
            for qs, ks, vs, ds, causal in work:
                out, lse, ctx = kernel.forward_unchecked(qs, ks, vs, causal=causal, scale=scale)
                if passes == "fwd_bwd":
                    kernel.backward_unchecked(ds, qs, ks, vs, out, lse, ctx, causal=causal, scale=scale)
    return run
