"""Packed documents: each training sequence holds whole documents, separated by attention masks (THD).

A document of ``n`` tokens (its end-of-document id included) gives ``n - 1`` positions: inputs
``tokens[:-1]``, labels ``tokens[1:]``, so no label crosses a document end. A document longer than
``seq_length`` positions is cut into pieces of ``seq_length`` (each a pack of its own; the last, shorter piece
is packed like any document). Pieces are packed first-fit into ``seq_length`` positions, each padded at its
end to a multiple of ``pad_multiple`` (a multiple of 2 * CP: the THD split cuts every padded document into
2 * CP chunks, rank r holding chunks r and 2 * CP - 1 - r, :func:`megatron_tasp.thd.partition_index`). The
room a pack has left becomes one padding-only document at its end.

A packed sample carries ``cu_seqlens`` (real lengths), ``cu_seqlens_padded``, positions restarting at 0 in
every document (RoPE: Megatron rotates every THD document from position 0 itself; learned absolute
embeddings read ``position_ids``) and a loss mask that is 0 on padding (and on SFT prompts). The model
receives Megatron's ``PackedSeqParams(qkv_format="thd")``; TASP's attention then never crosses a document and
skips the masked blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_tasp.apps.finetune_lib.blend import ItemDataset
from megatron_tasp.apps.finetune_lib.recipe import RecipeError

OPEN_PACKS = 64  # first-fit looks at the 64 most recently opened packs: O(documents), not O(documents x packs)


@dataclass
class Corpus:
    """Documents back to back in one token array: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.

    ``tokens`` is anything that slices into numpy arrays (an array, a memmap, a Megatron indexed dataset view);
    ``mask`` (SFT) is 1 on the tokens trained on when they are the label, None when every token is.
    """

    tokens: Any
    offsets: np.ndarray
    mask: np.ndarray | None = None

    @property
    def num_docs(self) -> int:
        """Documents."""
        return int(len(self.offsets) - 1)

    @property
    def num_tokens(self) -> int:
        """Tokens of all documents."""
        return int(self.offsets[-1])


@dataclass
class Packs:
    """Segments ``(document, first position in it, positions)`` of every pack, in CSR form (``ptr``)."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    ptr: np.ndarray

    def __len__(self) -> int:
        return int(len(self.ptr) - 1)


def pack_documents(lengths: np.ndarray, capacity: int, multiple: int, open_packs: int = OPEN_PACKS) -> Packs:
    """First-fit packing of documents of ``lengths`` positions into packs of ``capacity`` positions, every
    document padded to a multiple of ``multiple``; documents of ``capacity`` positions or more are cut into
    pieces of ``capacity`` first. Deterministic (documents in order); empty documents are skipped."""
    if capacity % multiple:
        raise ValueError(f"pack capacity {capacity} is not a multiple of the padding multiple {multiple}")
    packs: list[list[tuple[int, int, int]]] = []
    free = np.full(open_packs, -1, dtype=np.int64)    # room left in the open packs (-1: slot unused)
    owner = np.full(open_packs, -1, dtype=np.int64)   # pack of each slot
    for doc, n in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        start = 0
        while n - start >= capacity:
            packs.append([(doc, start, capacity)])
            start += capacity
        rest = n - start
        if rest <= 0:
            continue
        need = -(-rest // multiple) * multiple
        fits = np.flatnonzero(free >= need)
        if fits.size:  # the earliest opened pack with room
            slot = int(fits[np.argmin(owner[fits])])
            packs[int(owner[slot])].append((doc, start, rest))
            free[slot] -= need
            continue
        slot = int(np.argmin(owner))  # an unused slot (-1), else the oldest open pack's
        owner[slot], free[slot] = len(packs), capacity - need
        packs.append([(doc, start, rest)])
    segs = [s for p in packs for s in p]
    arr = np.asarray(segs, dtype=np.int64).reshape(-1, 3)
    ptr = np.zeros(len(packs) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in packs], out=ptr[1:])
    return Packs(doc=arr[:, 0], start=arr[:, 1], length=arr[:, 2], ptr=ptr)


@dataclass
class PackedSample:
    """One packed sequence of ``seq_length`` positions and its document boundaries."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray         # cumulative real lengths [n_docs + 1] (the last document may be padding only)
    cu_seqlens_padded: np.ndarray  # cumulative padded lengths; every document a multiple of pad_multiple


class PackedDataset(ItemDataset):
    """Packs of whole documents (:func:`pack_documents`), held out and ordered like windows (:class:`ItemDataset`)."""

    def __init__(self, corpus: Corpus, seq_length: int, pad_multiple: int, eval_fraction: float,
                 seed_key: tuple[int, ...], vocab_size: int | None = None) -> None:
        self.corpus, self.seq_length, self.pad_multiple = corpus, int(seq_length), int(pad_multiple)
        self.vocab_size = vocab_size
        lengths = np.maximum(np.diff(np.asarray(corpus.offsets, dtype=np.int64)) - 1, 0)
        self.packs = pack_documents(lengths, self.seq_length, self.pad_multiple)
        if len(self.packs) < 2:
            raise RecipeError(f"data: the corpus has {corpus.num_tokens} tokens in {corpus.num_docs} documents, fewer "
                              f"than two packed sequences of data.seq_length = {seq_length}; add documents or shorten "
                              "data.seq_length")
        self.real_positions = int(lengths.sum())
        self._setup_order(len(self.packs), eval_fraction, seed_key)

    def summary(self) -> str:
        """One line for the start-up banner."""
        fill = self.real_positions / (len(self.packs) * self.seq_length)
        return (f"{self.corpus.num_docs:,} documents, {self.corpus.num_tokens:,} tokens packed into "
                f"{len(self.packs):,} sequences ({fill:.0%} real tokens, documents padded to multiples of "
                f"{self.pad_multiple}), {self.num_train} train / {self.num_eval} held-out")

    def item(self, index: int) -> PackedSample:
        """Pack ``index`` laid out as one sequence."""
        c, s, m = self.corpus, self.seq_length, self.pad_multiple
        tokens, labels = np.zeros(s, dtype=np.int64), np.zeros(s, dtype=np.int64)
        loss_mask, positions = np.zeros(s, dtype=np.float32), np.zeros(s, dtype=np.int64)
        cu, cu_pad = [0], [0]
        lo, hi = int(self.packs.ptr[index]), int(self.packs.ptr[index + 1])
        for doc, first, n in zip(self.packs.doc[lo:hi].tolist(), self.packs.start[lo:hi].tolist(),
                                 self.packs.length[lo:hi].tolist()):
            a = int(c.offsets[doc]) + first
            ids = np.asarray(c.tokens[a:a + n + 1], dtype=np.int64)
            at = cu_pad[-1]
            tokens[at:at + n], labels[at:at + n] = ids[:-1], ids[1:]
            loss_mask[at:at + n] = 1.0 if c.mask is None else c.mask[a + 1:a + n + 1]
            padded = -(-n // m) * m
            positions[at:at + padded] = np.arange(padded)
            cu.append(cu[-1] + n)
            cu_pad.append(at + padded)
        if cu_pad[-1] < s:  # the room left: one padding-only document
            positions[cu_pad[-1]:] = np.arange(s - cu_pad[-1])
            cu.append(cu[-1])
            cu_pad.append(s)
        if self.vocab_size is not None and int(max(tokens.max(), labels.max())) >= self.vocab_size:
            raise RecipeError(f"data: token id {int(max(tokens.max(), labels.max()))} is outside the model's "
                              f"vocabulary of {self.vocab_size}: the data was tokenized with another tokenizer "
                              "(match tokenizer.* to the one used for data.path)")
        return PackedSample(tokens, labels, loss_mask, positions, np.asarray(cu, dtype=np.int32),
                            np.asarray(cu_pad, dtype=np.int32))

    def collate(self, samples: list[Any]) -> list[PackedSample]:
        """Packed samples stay a list (one THD sequence per micro-batch is made in :func:`packed_model_inputs`)."""
        return list(samples)


def packed_model_inputs(samples: list[PackedSample], cp_group: Any, device: Any) -> dict[str, Any]:
    """A micro-batch of packed samples as Megatron's THD inputs on ``device``: the samples back to back in one
    ``[1, b * seq]`` sequence (Megatron's packed batches have batch size 1), split over the CP ranks with TASP's
    THD partition (``megatron_tasp.megatron.thd_batch``), and ``packed_seq_params`` for the model."""
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_tasp.megatron.thd_batch import get_thd_batch_on_this_cp_rank

    cu, cu_pad = [np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.int64)]
    for s in samples:
        cu.append(s.cu_seqlens[1:].astype(np.int64) + cu[-1][-1])
        cu_pad.append(s.cu_seqlens_padded[1:].astype(np.int64) + cu_pad[-1][-1])
    cu_all, pad_all = np.concatenate(cu), np.concatenate(cu_pad)
    batch = {key: torch.from_numpy(np.concatenate([getattr(s, key) for s in samples]))[None]
             for key in ("tokens", "labels", "loss_mask", "position_ids")}
    pad_t = torch.from_numpy(pad_all.astype(np.int32))
    batch = get_thd_batch_on_this_cp_rank(batch, pad_t, cp_group)
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    longest = int(np.diff(pad_all).max())
    cu_t = torch.from_numpy(cu_all.astype(np.int32)).to(device)
    pad_t = pad_t.to(device)
    out["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                                               cu_seqlens_q_padded=pad_t, cu_seqlens_kv_padded=pad_t,
                                               max_seqlen_q=longest, max_seqlen_kv=longest)
    return out


__all__ = ["OPEN_PACKS", "Corpus", "PackedDataset", "PackedSample", "Packs", "pack_documents",
           "packed_model_inputs"]
