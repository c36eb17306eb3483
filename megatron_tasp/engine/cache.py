"""The plan cache: everything TASP builds once and reuses across calls, in one bounded, explicit object.

What it holds: compiled calls (plan, pieces, transports, kernel) by call signature, rank plans, piece
layouts, block kernels, the "this call signature was agreed on by every rank" marks, packed-document layouts
(a small LRU per scope, :meth:`Scope.layouts`), and the pools that must
outlive a call (CUDA streams; a group's persistent symmetric-memory buffers).

Scopes. Entries that depend on a process group live in that group's scope, keyed by the group's *global
ranks* (never ``id(group)`` or the rank inside the group); the scope also holds the group object and is
dropped when a different object with the same ranks turns up (a group destroyed and created again, e.g.
Megatron's ``destroy_model_parallel()`` followed by a new layout). Group-free entries (kernels, piece
layouts, CP=1 calls) live in the local scope.

Bounds and collectives. Building a group's entry may run collectives (the cross-rank agreement, host names,
an auto-probe), so every rank of a group must miss together. A group's scope is therefore its own LRU
(``max_entries``): every rank of the group makes the same calls on it in the same order, so every rank
evicts and rebuilds the same entries. ``max_groups`` bounds the number of group scopes (least recently used
dropped first). :meth:`PlanCache.clear` must be called on every rank, between steps (it drops persistent
buffers).

Besides the one instance here (``PLAN_CACHE``), the engine keeps no module-level mutable state; the
kernels' name registry (with its memo of op-schema bindings) and the compiled Triton merge kernel are the
only other process-wide objects, and none of them depends on a group, an option or a shape.

The default options (environment included) are resolved when a call signature is first compiled: after
``megatron_tasp.options.reload_env()`` call :func:`clear_plan_cache` too for the change to reach calls
already compiled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch.distributed as dist

from megatron_tasp.engine.exchange import StreamPool, SymmPool
from megatron_tasp.tuning import clear_caches


class Scope:
    """The entries of one process group (or of no group): an LRU of ``max_entries`` plus pinned pools."""

    __slots__ = ("group", "ranks", "entries", "max_entries", "symm_pool", "_layouts")

    #: packed-document layouts kept per scope: a new set of boundaries comes with every batch, and each layout
    #: holds index tensors on the device, so only the few most recent are kept (an LRU of their own)
    MAX_LAYOUTS = 8

    def __init__(self, group: Any, ranks: tuple[int, ...], max_entries: int):
        self.group = group
        self.ranks = ranks
        self.entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.max_entries = max_entries
        self.symm_pool: SymmPool | None = None  # created on the first 'symm' call; lives as long as the scope
        self._layouts: Scope | None = None

    def layouts(self) -> Scope:
        """The scope's packed-document layouts (a small LRU of :data:`MAX_LAYOUTS`; building one may run a
        collective, so like the scope itself every rank of the group makes the same calls on it)."""
        if self._layouts is None:
            self._layouts = Scope(self.group, self.ranks, self.MAX_LAYOUTS)
        return self._layouts

    def get(self, key: Hashable) -> Any:
        """The entry for ``key`` (marked recently used), or None."""
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> Any:
        """Store ``value`` under ``key`` (evicting the least recently used entry when full); returns it."""
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return value

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The entry for ``key``, built (and stored) on a miss."""
        value = self.get(key)
        return value if value is not None else self.put(key, build())

    def symm(self) -> SymmPool:
        """The group's persistent symmetric-memory pool (never evicted with the LRU entries)."""
        if self.symm_pool is None:
            self.symm_pool = SymmPool()
        return self.symm_pool


class PlanCache:
    """Bounded, explicit cache of the engine's reusable state (see the module doc)."""

    def __init__(self, max_entries: int = 256, max_groups: int = 64):
        self.max_entries = max_entries
        self.max_groups = max_groups
        self.local = Scope(None, (), max_entries)
        self.streams = StreamPool()
        self._groups: OrderedDict[tuple[int, ...], Scope] = OrderedDict()

    def scope(self, group: dist.ProcessGroup | None) -> Scope:
        """The scope of ``group`` (the local scope for None), keyed by its global ranks."""
        if group is None:
            return self.local
        ranks = tuple(dist.get_process_group_ranks(group))
        scope = self._groups.get(ranks)
        if scope is None or scope.group is not group:  # new ranks, or the group was created again
            scope = self._groups[ranks] = Scope(group, ranks, self.max_entries)
            while len(self._groups) > self.max_groups:
                self._groups.popitem(last=False)
        self._groups.move_to_end(ranks)
        return scope

    def clear(self) -> None:
        """Forget everything (call on every rank, between steps): plans, compiled calls, pools."""
        self.local = Scope(None, (), self.max_entries)
        self.streams = StreamPool()
        self._groups.clear()

    def __len__(self) -> int:
        scopes = [self.local, *self._groups.values()]
        return sum(len(s.entries) + (len(s._layouts.entries) if s._layouts is not None else 0) for s in scopes)


#: The engine's one cache.
PLAN_CACHE = PlanCache()


def clear_plan_cache() -> None:
    """Drop every cached plan, compiled call and pool, and the cost model's remembered choices and probe
    results (collective in spirit: call it on every rank)."""
    PLAN_CACHE.clear()
    clear_caches()
