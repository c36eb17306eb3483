"""Packed documents (THD) for TASP: the partition of a packed sequence over CP ranks.

Partition (Transformer Engine's THD convention, :func:`partition_index`): every document, padded at its end
to a multiple of 2·CP tokens, is cut into 2·CP equal chunks; CP rank r holds chunks r and 2·CP-1-r of every
document, documents in order. The local order is ``doc0 chunk r, doc0 chunk 2CP-1-r, doc1 chunk r, ...``.
The same partition serves causal and non-causal attention.

The engine's use of it (document masks on the dense zigzag machinery) lives in
:mod:`megatron_tasp.engine.thd`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["check_padded", "document_segments", "engine_order", "engine_segments", "host_bounds",
           "partition_index", "sequence_segments"]


def host_bounds(cu_seqlens_padded: torch.Tensor | Sequence[int]) -> list[int]:
    """Boundaries as host integers (a host sync when the tensor lives on a GPU)."""
    if isinstance(cu_seqlens_padded, torch.Tensor):
        return [int(x) for x in cu_seqlens_padded.tolist()]
    return [int(x) for x in cu_seqlens_padded]


def check_padded(cu_pad: Sequence[int], cp_size: int) -> None:
    """Raise ValueError unless ``cu_pad`` starts at 0 and every document length is a non-negative multiple of
    2·cp_size. CP size 1 holds every document whole, so there any non-negative length is fine (Megatron-LM's
    SFT dataset pads documents only when the CP size is above 1)."""
    if len(cu_pad) < 2 or cu_pad[0] != 0:
        raise ValueError(f"cu_seqlens_padded must start at 0 and hold n_docs + 1 boundaries, got {list(cu_pad)[:8]}")
    for i in range(len(cu_pad) - 1):
        n = cu_pad[i + 1] - cu_pad[i]
        if n < 0 or (cp_size > 1 and n % (2 * cp_size)):
            raise ValueError(f"document {i} has padded length {n}: every padded document length must be a "
                             f"non-negative multiple of 2*CP = {2 * cp_size} (pad each document at its end)")


def partition_index(cu_seqlens_padded: torch.Tensor | Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token indices CP rank ``cp_rank`` of ``cp_size`` holds, in its local order (a CPU LongTensor
    of ``cu_seqlens_padded[-1] // cp_size`` entries).

    ``cu_seqlens_padded``: cumulative padded document lengths ``[0, P_0, P_0 + P_1, ...]``, every ``P_i`` a
    multiple of 2·cp_size (any length at CP size 1, where the one rank holds every token in order). Rank r
    holds chunks r and 2·cp_size-1-r (each ``P_i / (2·cp_size)`` tokens) of every document, documents in order.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"need 0 <= cp_rank < cp_size, got cp_rank={cp_rank}, cp_size={cp_size}")
    cu = host_bounds(cu_seqlens_padded)
    check_padded(cu, cp_size)
    if cp_size == 1:
        return torch.arange(cu[-1], dtype=torch.long)
    starts = torch.tensor(cu[:-1], dtype=torch.long)
    chunk = (torch.tensor(cu[1:], dtype=torch.long) - starts) // (2 * cp_size)
    front = starts + cp_rank * chunk
    back = starts + (2 * cp_size - 1 - cp_rank) * chunk
    # per document: [front .. front + chunk) then [back .. back + chunk)
    run_start = torch.stack((front, back), dim=1).reshape(-1)
    run_len = torch.stack((chunk, chunk), dim=1).reshape(-1)
    total = int(run_len.sum())
    offsets = torch.cumsum(run_len, 0) - run_len  # local start of every run
    within = torch.arange(total, dtype=torch.long) - torch.repeat_interleave(offsets, run_len)
    return torch.repeat_interleave(run_start, run_len) + within


# ---------------------------------------------------------------------------------------------------------
# the engine's order: [F ; B] (see megatron_tasp.engine.thd)
# ---------------------------------------------------------------------------------------------------------
def _doc_runs(cu_pad: Sequence[int], cu: Sequence[int], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chunk length, real length, front-block start) per document, as CPU LongTensors."""
    pad_len = torch.tensor(cu_pad[1:], dtype=torch.long) - torch.tensor(cu_pad[:-1], dtype=torch.long)
    real = torch.tensor(cu[1:], dtype=torch.long) - torch.tensor(cu[:-1], dtype=torch.long)
    chunk = pad_len // (2 * n)
    return chunk, real, torch.cumsum(chunk, 0) - chunk


def _within(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(document id, position inside the document's run) of every token of runs of ``lengths``."""
    doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return doc, torch.arange(int(lengths.sum())) - starts[doc]


def engine_segments(cu_pad: Sequence[int], cu: Sequence[int], n: int, rank: int) -> torch.Tensor:
    """Segment id of every token of CP rank ``rank`` in the engine's order ``[F ; B]`` (F: chunk ``rank`` of
    every document, B: chunk ``2n-1-rank`` of every document): ``2i`` for the real tokens of document i,
    ``2i + 1`` for its padding (which the engine's blocks pair with nothing)."""
    chunk, real, _ = _doc_runs(cu_pad, cu, n)
    doc, m = _within(chunk)
    parts = []
    for ch in (rank, 2 * n - 1 - rank):
        pos = ch * chunk[doc] + m  # position inside the padded document
        parts.append(2 * doc + (pos >= real[doc]).long())
    return torch.cat(parts)


def engine_order(cu_pad: Sequence[int], n: int) -> torch.Tensor:
    """Local THD position of every token in the engine's order ``[F ; B]`` (the same for every rank)."""
    chunk, _, fstart = _doc_runs(cu_pad, cu_pad, n)
    doc, m = _within(chunk)
    local_start = 2 * fstart  # doc i's two chunks start here in the THD local order
    return torch.cat((local_start[doc] + m, local_start[doc] + chunk[doc] + m))


def document_segments(cu_pad: Sequence[int], cu: Sequence[int]) -> torch.Tensor:
    """Segment id of every token of the packed sequence in its own order: ``2i`` for the real tokens of
    document i, ``2i + 1`` for its padding (``cu_pad``: padded boundaries, ``cu``: real ones)."""
    lengths = torch.tensor(cu_pad[1:], dtype=torch.long) - torch.tensor(cu_pad[:-1], dtype=torch.long)
    real = torch.tensor(cu[1:], dtype=torch.long) - torch.tensor(cu[:-1], dtype=torch.long)
    doc, pos = _within(lengths)
    return 2 * doc + (pos >= real[doc]).long()


def sequence_segments(cu: Sequence[int], n: int, rank: int) -> torch.Tensor:
    """Segment id (``2i`` for document i) of every token CP rank ``rank`` holds when the packed sequence was
    split as a whole (``packed_split='sequence'``): chunks ``rank`` and ``2n-1-rank`` of ``2n`` equal chunks
    of the sequence, in that order (the dense zigzag layout, which is the engine's order). ``cu``: cumulative
    document lengths, any lengths, ending at the sequence length (a multiple of 2n)."""
    seg = document_segments(cu, cu)
    chunk = cu[-1] // (2 * n)
    return torch.cat((seg[rank * chunk:(rank + 1) * chunk], seg[(2 * n - 1 - rank) * chunk:(2 * n - rank) * chunk]))
