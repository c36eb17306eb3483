"""Sample order of the fine-tuning datasets (numpy only): held-out items, the seeded order, blends.

A dataset is a list of items (fixed windows or packs of documents). :class:`ItemDataset` holds every
``round(1/eval_fraction)``-th item out for evaluation and visits the others in a seeded random order, epoch
after epoch: training sample ``k`` is a pure function of ``(seed, k)``, so the number of consumed samples is
the whole data position (checkpoints store it and resume exactly, whatever the data-parallel size).

:class:`Blend` draws from several datasets at fixed shares (``data.weights``). Megatron-Core's
``BlendedDataset`` is not used: it blends ``MegatronDataset`` instances built from a
``BlendedMegatronDatasetConfig`` (split strings, a tokenizer object, an on-disk index cache) and computes its
indices with the compiled ``helpers`` extension; the unit here is a pack of whole documents, whose order must be
a pure function of ``(seed, k)`` without a cache, so a small weighted sampler is written here instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ItemDataset:
    """Items ``0 .. n-1``: held-out ones every stride-th, the rest in a seeded random order per epoch.

    Subclasses call :meth:`_setup_order` and define :meth:`item` (one sample) and :meth:`collate` (a list of
    samples -> what :func:`~megatron_tasp.apps.finetune_lib.data.model_inputs` takes).
    """

    train_items: np.ndarray
    eval_items: np.ndarray

    def _setup_order(self, n: int, eval_fraction: float, seed_key: tuple[int, ...]) -> None:
        items = np.arange(n)
        if eval_fraction > 0:
            stride = max(2, round(1.0 / eval_fraction))
            held = items % stride == stride - 1
            if not held.any():
                held[-1] = True
            self.eval_items, self.train_items = items[held], items[~held]
        else:
            self.eval_items, self.train_items = items[:0], items
        self._seed_key = tuple(int(s) for s in seed_key)
        self._perm_epoch = -1
        self._perm: np.ndarray = self.train_items

    @property
    def num_train(self) -> int:
        """Training items per epoch."""
        return int(len(self.train_items))

    @property
    def num_eval(self) -> int:
        """Held-out items."""
        return int(len(self.eval_items))

    def train_index(self, sample: int) -> int:
        """Item of the ``sample``-th training sample (seeded shuffle per epoch)."""
        epoch, pos = divmod(int(sample), self.num_train)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([*self._seed_key, epoch])
            self._perm = self.train_items[rng.permutation(self.num_train)]
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def item(self, index: int) -> Any:
        """Item ``index`` as one sample."""
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> Any:
        """Samples -> a batch."""
        raise NotImplementedError

    def train_item(self, sample: int) -> Any:
        """The ``sample``-th training sample."""
        return self.item(self.train_index(sample))

    def train_samples(self, first: int, count: int) -> Any:
        """Training samples ``first .. first + count - 1`` as one batch."""
        return self.collate([self.train_item(first + i) for i in range(count)])

    def eval_samples(self, count: int) -> Any:
        """``count`` held-out samples, evenly spread over the held-out set."""
        return self.collate([self.item(int(self.eval_items[i])) for i in spread(self.num_eval, count)])


def spread(n: int, count: int) -> list[int]:
    """``min(count, n)`` indices evenly spread over ``0 .. n-1``."""
    if count <= 0 or n <= 0:
        return []
    return [int(i) for i in np.linspace(0, n - 1, num=min(count, n)).round()]


def blend_counts(weights: list[float], total: int) -> np.ndarray:
    """Samples of each part in a blended epoch of about ``total``: ``weights`` shares by largest remainder,
    at least one for every part."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum() * total
    counts = np.floor(share).astype(np.int64)
    left = total - int(counts.sum())
    if left > 0:
        order = np.argsort(-(share - counts), kind="stable")
        counts[order[:left]] += 1
    return np.maximum(counts, 1)


class Blend:
    """Several datasets sampled at fixed shares: sample ``k`` -> (part ``c``, the part's ``j``-th training
    sample), a pure function of ``(seed, k)``.

    A blended epoch holds ``counts[c]`` samples of part ``c`` (``weights`` shares of the parts' total training
    items; by default each part's own size, i.e. every item once) in a seeded random order; part ``c`` walks
    through its own epochs (its own seeded order) as the blend draws from it.
    """

    def __init__(self, parts: list[ItemDataset], weights: list[float] | None, seed: int) -> None:
        self.parts = parts
        sizes = [p.num_train for p in parts]
        self.counts = blend_counts(list(weights) if weights is not None else sizes, sum(sizes))
        self.epoch_len = int(self.counts.sum())
        self.seed = int(seed)
        self._epoch = -1
        self._labels = self._ranks = np.zeros(0, dtype=np.int64)

    @property
    def num_train(self) -> int:
        """Samples per blended epoch."""
        return self.epoch_len

    @property
    def num_eval(self) -> int:
        """Held-out items of all parts."""
        return sum(p.num_eval for p in self.parts)

    def locate(self, sample: int) -> tuple[int, int]:
        """``(part, the part's training sample)`` of blended sample ``sample``."""
        epoch, pos = divmod(int(sample), self.epoch_len)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            labels = rng.permutation(np.repeat(np.arange(len(self.parts)), self.counts))
            ranks = np.empty_like(labels)
            for c in range(len(self.parts)):
                where = np.flatnonzero(labels == c)
                ranks[where] = np.arange(where.size)
            self._labels, self._ranks, self._epoch = labels, ranks, epoch
        c = int(self._labels[pos])
        return c, epoch * int(self.counts[c]) + int(self._ranks[pos])

    def train_samples(self, first: int, count: int) -> Any:
        """Blended training samples ``first .. first + count - 1`` as one batch."""
        picked = [self.locate(first + i) for i in range(count)]
        return self.parts[0].collate([self.parts[c].train_item(j) for c, j in picked])

    def eval_samples(self, count: int) -> Any:
        """``count`` held-out samples evenly spread over all parts' held-out items (parts in order)."""
        pool = [(c, int(i)) for c, p in enumerate(self.parts) for i in p.eval_items]
        return self.parts[0].collate([self.parts[pool[k][0]].item(pool[k][1]) for k in spread(len(pool), count)])


__all__ = ["Blend", "ItemDataset", "blend_counts", "spread"]
