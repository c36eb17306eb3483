"""Megatron indexed datasets (``.bin``/``.idx``) as fine-tuning corpora, read with Megatron-Core's IndexedDataset.

``data.source: indexed`` with ``data.path`` = one or more path prefixes. The index gives the sequences and the
documents (``document_indices``: a document is one or more consecutive sequences; Megatron-LM's
``tools/preprocess_data.py`` and ``megatron-tasp preprocess`` write one sequence per document, its
end-of-document id appended), so packing uses the real document boundaries. Tokens are read with
``IndexedDataset.get``. Several prefixes are blended (:class:`~megatron_tasp.apps.finetune_lib.blend.Blend`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from megatron_tasp.apps.finetune_lib.packing import Corpus
from megatron_tasp.apps.finetune_lib.recipe import Recipe, RecipeError


def indexed_dataset_class() -> Any:
    """Megatron-Core's ``IndexedDataset`` (the CPU stand-ins are installed first where needed)."""
    from megatron_tasp.megatron.cpu_compat import prepare_megatron_import

    prepare_megatron_import()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset


def prefixes(recipe: Recipe) -> list[str]:
    """The recipe's ``data.path`` as indexed-dataset prefixes (``~``/``$VARS`` expanded, a .bin/.idx suffix
    dropped); raises RecipeError naming a prefix whose files are missing."""
    paths = recipe.data.path if isinstance(recipe.data.path, list) else [recipe.data.path]
    out = []
    for item in paths:
        prefix = os.path.expanduser(os.path.expandvars(str(item)))
        if prefix.endswith((".bin", ".idx")):
            prefix = prefix[:-4]
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise RecipeError(f"{recipe.source}: data.path: no Megatron indexed dataset at '{item}' ({missing[0]} "
                              "is missing); write one with megatron-tasp preprocess")
        out.append(prefix)
    return out


class IndexedTokens:
    """The tokens of an IndexedDataset as one flat, sliceable array (its sequences lie back to back in the .bin)."""

    def __init__(self, dataset: Any, prefix: str) -> None:
        self.dataset = dataset
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        self.starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.starts[1:])
        index = dataset.index
        pointers = np.asarray(index.sequence_pointers, dtype=np.int64) // np.dtype(index.dtype).itemsize
        if not np.array_equal(pointers, self.starts[:-1]):
            raise RecipeError(f"data.path: {prefix}.bin does not hold its sequences back to back; rewrite it with "
                              "megatron-tasp preprocess (or Megatron-LM's tools/preprocess_data.py)")
        self.dtype = np.dtype(index.dtype)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("IndexedTokens supports contiguous slices only")
        a, b, _ = key.indices(len(self))
        parts = []
        seq = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            end = min(b, int(self.starts[seq + 1]))
            if end > a:
                parts.append(np.asarray(self.dataset.get(seq, a - int(self.starts[seq]), end - a)))
            a, seq = end, seq + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


def open_indexed(prefix: str) -> Corpus:
    """The documents of one indexed dataset."""
    dataset = indexed_dataset_class()(prefix, mmap=True)
    tokens = IndexedTokens(dataset, prefix)
    docs = np.asarray(dataset.document_indices, dtype=np.int64)
    return Corpus(tokens=tokens, offsets=tokens.starts[docs])


__all__ = ["IndexedTokens", "indexed_dataset_class", "open_indexed", "prefixes"]
