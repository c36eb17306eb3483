"""Held-out evaluation: the mean loss and the loss by position in the sequence, under context parallelism.

Token ``p`` of a sequence carries the loss of predicting token ``p + 1`` from tokens ``0 .. p``. Under CP each
rank holds the zigzag chunks ``r`` and ``2cp-1-r`` of every sequence, so :func:`sequence_positions` gives the
global position of every local token (the one place that defines it); :func:`bucket_sums` adds the per-token
losses into position buckets, and :func:`heldout_loss` reduces the sums and token counts over the DP x CP
ranks. Later buckets have lower loss when the model uses its longer context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_tasp.apps.finetune_lib.data import cp_split

_PACKED_KEYS = ("cu_seqlens", "cu_seqlens_padded", "packed_seq_params")


def position_edges(seq_length: int, buckets: int, spacing: str) -> list[int]:
    """Bucket edges ``[0, e1, ..., seq_length]`` (bucket i holds positions ``edges[i] <= p < edges[i+1]``).

    ``log2``: the top bucket is the second half of the sequence, each lower one half as wide, the first from 0
    (``seq/2^(n-1)`` wide); buckets narrower than one token are merged into the first. ``linear``: equal widths.
    """
    if buckets < 1:
        raise ValueError(f"position buckets must be >= 1, got {buckets}")
    if spacing == "linear":
        if buckets > seq_length:
            raise ValueError(f"{buckets} linear position buckets exceed the {seq_length} positions")
        edges = [round(i * seq_length / buckets) for i in range(buckets + 1)]
    elif spacing == "log2":
        edges = sorted({0} | {seq_length >> j for j in range(buckets)})
    else:
        raise ValueError(f"position spacing must be log2 or linear, got {spacing!r}")
    return edges


def bucket_label(lo: int, hi: int) -> str:
    """``"2K-4K"``-style label of the positions ``lo .. hi - 1``."""
    def short(n: int) -> str:
        for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
            if n >= size and n % size == 0:
                return f"{n // size}{unit}"
        return str(n)
    return f"{short(lo)}-{short(hi)}"


def sequence_positions(batch: dict[str, Any], cp_group: Any) -> torch.Tensor:
    """The position in the sequence (global token index, ``[b, s_local]``) of every local token of a
    :func:`~.data.model_inputs` batch: Megatron's zigzag split applied to ``arange(seq)``, so it is the same
    split that cut the tokens.

    This is the one source of positions for the loss by position and the passkey scoring. With packed
    documents the split is per document and the position within a document is another view; such batches
    are refused here rather than mapped to the wrong positions.
    """
    packed = [k for k in _PACKED_KEYS if batch.get(k) is not None]
    if packed:
        raise ValueError(f"loss by position and the passkey check do not map packed batches ({', '.join(packed)}) "
                         "to sequence positions yet; set train.eval_position_buckets=0 and passkey.lengths=null")
    labels = batch["labels"]
    cp = 1 if cp_group is None else dist.get_world_size(cp_group)
    b, local = labels.shape
    index = torch.arange(local * cp, device=labels.device).unsqueeze(0).expand(b, -1).contiguous()
    positions = cp_split({"position_ids": index}, cp_group)["position_ids"]
    if "position_ids" in batch and not torch.equal(positions, batch["position_ids"]):
        raise RuntimeError("the batch's position_ids are not the zigzag split of the sequence positions: the data "
                           "split changed without sequence_positions() following it")
    return positions


def bucket_sums(per_token: torch.Tensor, positions: torch.Tensor, edges: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket loss sums (float64) and token counts (int64) of per-token losses at ``positions``."""
    bounds = torch.as_tensor(edges[1:-1], dtype=positions.dtype, device=positions.device)
    index = torch.bucketize(positions.reshape(-1), bounds, right=True)
    n = len(edges) - 1
    sums = torch.zeros(n, dtype=torch.float64, device=per_token.device)
    sums.index_add_(0, index, per_token.detach().reshape(-1).to(torch.float64))
    counts = torch.bincount(index, minlength=n).to(torch.int64)
    return sums, counts


def heldout_loss(forward: Callable[[dict[str, Any]], torch.Tensor], batches: Iterator[dict[str, Any]],
                 edges: list[int], cp_group: Any, reduce_group: Any, device: torch.device) -> dict[str, Any]:
    """Mean held-out loss and its split by position bucket, summed over ``reduce_group`` (DP x CP).

    ``forward(batch)`` returns the per-token loss ``[b, s_local]`` of a :func:`~.data.model_inputs` batch.
    """
    n = len(edges) - 1
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.int64, device=device)
    for batch in batches:
        s, c = bucket_sums(forward(batch), sequence_positions(batch, cp_group), edges)
        sums += s
        counts += c
    both = torch.cat([sums, counts.to(torch.float64)])  # one collective; counts are exact in float64
    if reduce_group is not None and dist.get_world_size(reduce_group) > 1:
        dist.all_reduce(both, group=reduce_group)
    sums, counts = both[:n].cpu().numpy(), both[n:].cpu().numpy().astype(np.int64)
    total = int(counts.sum())
    out: dict[str, Any] = {"loss": float(sums.sum()) / total if total else math.nan, "tokens": total}
    if n > 1:
        out["position_loss"] = {
            "edges": [int(e) for e in edges],
            "loss": [float(s) / int(c) if c else None for s, c in zip(sums, counts, strict=True)],
            "tokens": [int(c) for c in counts],
        }
    return out


__all__ = ["bucket_label", "bucket_sums", "heldout_loss", "position_edges", "sequence_positions"]
