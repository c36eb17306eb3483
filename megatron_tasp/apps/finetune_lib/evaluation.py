"""Held-out evaluation: the mean loss and the loss by position, under context parallelism, for windows and for
packed documents.

Token ``p`` carries the loss of predicting token ``p + 1`` from the tokens before it. Under CP each rank holds
part of every sequence: of windows the zigzag chunks ``r`` and ``2cp-1-r``, of packed documents those chunks of
every document (TASP's THD split). :func:`token_positions` gives the position of every local token (the one
place that defines it), :func:`bucket_sums` adds the per-token losses the loss mask keeps into position buckets,
and :func:`heldout_loss` reduces the sums and token counts over the DP x CP ranks. Later buckets have lower
loss when the model uses its longer context.

Two views of a position: ``sequence`` (the token's index in its training sequence) and ``document`` (its index
in its own document; packed documents only, where attention never crosses a document, so this is the context
the model actually has).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_tasp.apps.finetune_lib.data import cp_split

POSITION_VIEWS = ("sequence", "document")


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


def _packed_index(batch: dict[str, Any], cp_group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Global index in the packed ``[1, b * seq]`` micro-batch of every local token, and the padded start of its
    document: ``arange`` split by the THD partition that cut the tokens (``packed_model_inputs``)."""
    from megatron_tasp.megatron.thd_batch import get_thd_batch_on_this_cp_rank

    cu = batch["packed_seq_params"].cu_seqlens_q_padded.to(torch.long)
    cp = 1 if cp_group is None else dist.get_world_size(cp_group)
    labels = batch["labels"]
    index = torch.arange(labels.shape[1] * cp, device=labels.device)[None]
    index = get_thd_batch_on_this_cp_rank({"position_ids": index}, cu, cp_group, keys=("position_ids",))["position_ids"]
    start = cu[torch.searchsorted(cu, index, right=True) - 1]
    return index, start


def token_positions(batch: dict[str, Any], cp_group: Any, seq_length: int, view: str = "sequence") -> torch.Tensor:
    """The position (``[b, s_local]``) of every local token of a :func:`~.data.model_inputs` batch, found by
    splitting ``arange`` the way the tokens were split (so it follows the CP layout by construction).

    ``sequence``: the index in the training sequence (windows: Megatron's zigzag split; packed micro-batches,
    whose samples lie back to back, modulo ``seq_length``). ``document``: the index in the token's own packed
    document. Both are checked against the batch's ``position_ids`` (window positions; document positions).
    """
    if view not in POSITION_VIEWS:
        raise ValueError(f"position view must be one of {', '.join(POSITION_VIEWS)}, got {view!r}")
    if batch.get("packed_seq_params") is not None:
        index, start = _packed_index(batch, cp_group)
        if not torch.equal(index - start, batch["position_ids"]):
            raise RuntimeError("the packed batch's position_ids are not the positions in its documents: the THD split "
                               "changed without token_positions() following it")
        return index % seq_length if view == "sequence" else index - start
    if view == "document":
        raise ValueError("positions in the document need packed documents (data.packing: true); windows mix "
                         "documents under one causal mask, so use the sequence view")
    labels = batch["labels"]
    cp = 1 if cp_group is None else dist.get_world_size(cp_group)
    b, local = labels.shape
    index = torch.arange(local * cp, device=labels.device).unsqueeze(0).expand(b, -1).contiguous()
    positions = cp_split({"position_ids": index}, cp_group)["position_ids"]
    if "position_ids" in batch and not torch.equal(positions, batch["position_ids"]):
        raise RuntimeError("the batch's position_ids are not the zigzag split of the sequence positions: the data "
                           "split changed without token_positions() following it")
    return positions


def bucket_sums(per_token: torch.Tensor, positions: torch.Tensor, edges: list[int],
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket loss sums (float64) and token counts (int64) of per-token losses at ``positions``; with a 0/1
    ``mask`` only the tokens it keeps (packed padding and SFT prompts are 0). Positions past the last edge (a
    padding-only document's) must be masked."""
    bounds = torch.as_tensor(edges[1:-1], dtype=positions.dtype, device=positions.device)
    index = torch.bucketize(positions.reshape(-1), bounds, right=True)
    keep = torch.ones_like(index, dtype=torch.float64) if mask is None else mask.reshape(-1).to(torch.float64)
    if bool(((positions.reshape(-1) >= edges[-1]) & (keep > 0)).any()):
        raise ValueError(f"a kept token lies at a position >= {edges[-1]}, past the last position bucket")
    index = index.clamp_(max=len(edges) - 2)
    n = len(edges) - 1
    sums = torch.zeros(n, dtype=torch.float64, device=per_token.device)
    sums.index_add_(0, index, per_token.detach().reshape(-1).to(torch.float64) * keep)
    counts = torch.zeros(n, dtype=torch.float64, device=per_token.device).index_add_(0, index, keep)
    return sums, counts.round().to(torch.int64)


def heldout_loss(forward: Callable[[dict[str, Any]], torch.Tensor], batches: Iterator[dict[str, Any]],
                 edges: list[int], cp_group: Any, reduce_group: Any, device: torch.device,
                 view: str = "sequence") -> dict[str, Any]:
    """Mean held-out loss over the tokens the loss masks keep, and its split by position bucket (``view``),
    summed over ``reduce_group`` (DP x CP).

    ``forward(batch)`` returns the per-token loss ``[b, s_local]`` of a :func:`~.data.model_inputs` batch.
    """
    n = len(edges) - 1
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.int64, device=device)
    for batch in batches:
        s, c = bucket_sums(forward(batch), token_positions(batch, cp_group, edges[-1], view), edges,
                           batch.get("loss_mask"))
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
            "view": view,
            "edges": [int(e) for e in edges],
            "loss": [float(s) / int(c) if c else None for s, c in zip(sums, counts, strict=True)],
            "tokens": [int(c) for c in counts],
        }
    return out


__all__ = ["POSITION_VIEWS", "bucket_label", "bucket_sums", "heldout_loss", "position_edges", "token_positions"]
