"""Packed (THD) batches split over CP ranks with TASP's partition, without Transformer Engine.

Megatron-Core's ``get_batch_on_this_cp_rank`` (megatron/core/utils.py) splits a packed batch per document
by calling Transformer Engine's ``thd_get_partitioned_indices``; without TE that fails. TASP defines the
same layout itself (``megatron_tasp.thd.partition_index``: every document, padded to a multiple of 2·CP, is
cut into 2·CP chunks; rank r holds chunks r and 2·CP-1-r of every document, documents in order), so:

- :func:`get_thd_batch_on_this_cp_rank` selects this rank's tokens of a packed batch;
- :func:`install_thd_batch_partition` makes Megatron-Core's ``get_batch_on_this_cp_rank`` use it for
  per-document splits (it replaces ``megatron.core.utils._get_batch_on_this_cp_rank_per_document_balancing``,
  which ``get_batch_on_this_cp_rank`` looks up when called, so callers that imported
  ``get_batch_on_this_cp_rank`` by name, like Megatron-LM's ``pretrain_gpt.get_batch``, are covered).

The launcher (``megatron_tasp.megatron.pretrain_gpt``) and the Megatron-LM patch call
:func:`install_thd_batch_partition` when TASP is selected. Imports torch and Megatron lazily.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_TARGET = "_get_batch_on_this_cp_rank_per_document_balancing"
_MARK = "_megatron_tasp_thd"
logger = logging.getLogger("megatron_tasp")


def _partition_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """``megatron_tasp.thd.partition_index``, looked up when called."""
    return importlib.import_module("megatron_tasp.thd").partition_index(cu_seqlens_padded, cp_size, cp_rank)


def _flat_cu(cu_seqlens_padded: Any) -> torch.Tensor:
    """A 1-D ``[n_docs + 1]`` view of cu_seqlens (Megatron-LM batches keep a leading batch dim of 1)."""
    cu = torch.as_tensor(cu_seqlens_padded)
    if cu.dim() == 2 and cu.shape[0] == 1:
        cu = cu[0]
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be [n_docs + 1] (or [1, n_docs + 1]), got {tuple(cu.shape)}: flatten "
                         "micro-batches first (megatron.core.utils.flatten_batch_for_packed_sequences)")
    return cu


def _group_size_rank(cp_group: Any) -> tuple[int, int]:
    if cp_group is None:
        return 1, 0
    import torch.distributed as dist

    return dist.get_world_size(cp_group), dist.get_rank(cp_group)


def get_thd_batch_on_this_cp_rank(batch: dict[str, Any], cu_seqlens_padded: Any, cp_group: Any, *,
                                  keys: tuple[str, ...] = SEQUENCE_KEYS) -> dict[str, Any]:
    """This CP rank's tokens of a packed batch: ``batch[key]`` (``[1, T, ...]``) for each of ``keys`` becomes
    ``[1, T / cp, ...]`` in TASP's THD partition; other entries (cu_seqlens, max_seqlen, ...) stay global.

    ``cu_seqlens_padded`` are the global cumulative padded document lengths (``[n_docs + 1]`` or
    ``[1, n_docs + 1]``); every padded document length must be a multiple of 2·CP and they must cover the
    ``T`` tokens. Modifies and returns ``batch``; at CP 1 it returns it unchanged.
    """
    cp_size, cp_rank = _group_size_rank(cp_group)
    if cp_size == 1:
        return batch
    present = [k for k in keys if batch.get(k) is not None]
    if not present:
        return batch
    cu = _flat_cu(cu_seqlens_padded)
    total = int(batch[present[0]].shape[1])
    if int(cu[-1]) != total or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_padded spans tokens [{int(cu[0])}, {int(cu[-1])}) but the packed batch has "
                         f"{total}: the padded documents must cover the sequence exactly (start at 0, end at {total})")
    index = _partition_index(cu, cp_size, cp_rank)
    for key in present:
        value = batch[key]
        if value.shape[1] != total:
            raise ValueError(f"batch[{key!r}] has {value.shape[1]} tokens, batch[{present[0]!r}] {total}")
        batch[key] = value.index_select(1, index.to(value.device))
    return batch


def per_document_cp_split(batch: dict[str, Any], cp_group: Any) -> dict[str, Any]:
    """Megatron-Core's per-document CP split (same signature), with TASP's partition instead of TE's:
    ``cu_seqlens_padded`` when the batch has it, else ``cu_seqlens``."""
    cu = batch.get("cu_seqlens_padded")
    if cu is None:
        cu = batch.get("cu_seqlens")
    if cu is None:
        raise ValueError("a packed batch needs cu_seqlens (or cu_seqlens_padded) for the per-document CP split")
    return get_thd_batch_on_this_cp_rank(batch, cu, cp_group)


per_document_cp_split.__dict__[_MARK] = True


def install_thd_batch_partition() -> bool:
    """Make ``megatron.core.utils.get_batch_on_this_cp_rank`` split packed batches with TASP's partition
    (no Transformer Engine needed; the layout is TE's). Idempotent; returns True when newly installed.

    Raises RuntimeError when this Megatron-Core has no per-document split function to replace (the batch
    would then go through Transformer Engine, or fail without it): use megatron-core 0.19.
    """
    import megatron.core.utils as mutils

    current = getattr(mutils, _TARGET, None)
    if current is None:
        raise RuntimeError(f"megatron.core.utils has no {_TARGET} (megatron-core 0.19 layout expected): packed "
                           "(THD) batches cannot be split with TASP's partition; use megatron-core 0.19")
    if getattr(current, _MARK, False):
        return False
    per_document_cp_split.__dict__["original"] = current
    setattr(mutils, _TARGET, per_document_cp_split)
    logger.info("packed (THD) batches are split over CP ranks with megatron_tasp.thd.partition_index")
    return True


def uninstall_thd_batch_partition() -> None:
    """Undo :func:`install_thd_batch_partition` (tests)."""
    import megatron.core.utils as mutils

    current = getattr(mutils, _TARGET, None)
    original = getattr(current, "original", None)
    if getattr(current, _MARK, False) and original is not None:
        setattr(mutils, _TARGET, original)


__all__ = ["SEQUENCE_KEYS", "get_thd_batch_on_this_cp_rank", "install_thd_batch_partition",
           "per_document_cp_split", "uninstall_thd_batch_partition"]
