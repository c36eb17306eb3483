"""RoPE for packed (THD) batches without a host synchronisation, for Megatron-Core without Transformer Engine.

Megatron-Core's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``, the path taken without TE's fused
kernel) reads the document lengths to the host (``.tolist()``, and ``.item()`` once more, or once per document
when ``freqs`` covers the whole pack) and, in 0.19, rotates one document at a time: for a 10-document pack
about 500-600 aten ops per call (0.16 gathers the freqs per document and rotates once: ~130-190). Called for
the queries and the keys of every layer, that leaves the GPU idle in packed (``--sft``) training, the more so
the smaller the per-rank micro-batch (context parallelism).

:func:`packed_rope` computes the same result in one pass (~90-115 aten ops): the freqs row of every local
token is found on the device (one searchsorted over the local document ends), gathered, and Megatron-Core's
own ``_apply_rotary_pos_emb_bshd`` rotates the whole tensor at once. Every operation is element-wise, so the
output equals Megatron-Core's bit for bit, forward and backward (tests/test_megatron_thd_rope.py). The
positions follow Megatron-Core exactly: per-document positions restarting at 0 when ``freqs`` covers the
longest document, whole-pack positions (each document offset by its start) when ``freqs`` covers the whole
pack; on CP rank r of size n, document chunks r and 2n-1-r (the THD partition). One difference: with
``rotary_interleaved`` megatron-core 0.19 fails on an empty document, which this computes like any other.

The positions are not kept between layers: a cache keyed on the boundary tensor could be served stale when that
tensor is refilled in place by a collective, which does not move its version counter. Only the call right after
may reuse them (the keys' call after the queries' in one attention forward, which pass the same boundary and
freqs tensors): each router keeps the last call's gathered freqs rows with weak references to the tensors they
came from, their storage and version, and hands them to the next call alone when all of that still matches.

:func:`install_thd_rope` routes ``megatron.core.transformer.attention``'s ``apply_rotary_pos_emb`` calls for
THD tensors through it when the fused TE kernel is not in use; everything else (and any argument it does not
know) goes to Megatron-Core's function unchanged; ``megatron.core.transformer.multi_latent_attention``'s calls
(MLA's rotary part of the queries and keys) get a router of their own. Other callers of ``rope_utils``
(inference contexts, megatron-core 0.19's experimental attention variants ``absorbed_mla`` and ``dsa``) are not
routed: they keep megatron-core's host-synchronising THD RoPE (slower, same result). The launcher, the
Megatron-LM patch and the fine-tuning app (packed data) install it when TASP is selected; installing checks on a
small CPU case that this Megatron-Core computes what :func:`packed_rope` does, and refuses otherwise.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Any

import torch

_MARK = "_megatron_tasp_thd_rope"
_ATTENTION = "megatron.core.transformer.attention"  # the callers routed: attention, and MLA where it exists
_MLA = "megatron.core.transformer.multi_latent_attention"
logger = logging.getLogger("megatron_tasp")


def thd_rope_positions(cu_seqlens: torch.Tensor, tokens: int, cp_size: int, cp_rank: int, *,
                       pack_offsets: bool) -> torch.Tensor:
    """The freqs row (int64 ``[tokens]``) of each of this rank's ``tokens`` packed tokens, computed on
    ``cu_seqlens``'s device with no host read.

    ``cu_seqlens``: global cumulative (padded) document lengths ``[n_docs + 1]``; this rank holds
    ``length // cp_size`` tokens of each document, in order, as chunks ``cp_rank`` and ``2·cp_size-1-cp_rank``
    of ``2·cp_size`` when ``cp_size > 1``. ``pack_offsets``: add each document's start (positions over the
    whole pack) instead of restarting at 0 per document. Inputs Megatron-Core's THD RoPE refuses (boundaries
    not ascending, local lengths not covering ``tokens``; at ``cp_size > 1`` a padded length not a multiple of
    ``2·cp_size``, which TASP's attention refuses too) fail a device-side assertion: a RuntimeError on CPU, on
    CUDA a device-side assert that ends the process (the batch split and TASP's attention check the same
    boundaries on the host with a clear message first).
    """
    cu = cu_seqlens.reshape(-1).long()
    lengths = cu[1:] - cu[:-1]
    local = lengths // cp_size
    local_end = local.cumsum(0)
    valid = (local_end[-1] == tokens) & torch.all(lengths >= 0)
    if cp_size > 1:
        valid = valid & torch.all(lengths % (2 * cp_size) == 0)
    torch._assert_async(valid, "THD RoPE: document boundaries must ascend, cover this rank's tokens and (CP > 1) "
                        "be multiples of 2 * CP")
    token = torch.arange(tokens, device=cu.device)
    doc = torch.searchsorted(local_end, token, right=True).clamp_(max=local.numel() - 1)
    within = token - (local_end - local)[doc]
    if cp_size == 1:
        pos = within
    else:
        chunk = (local // 2)[doc]
        pos = torch.where(within < chunk, cp_rank * chunk + within,
                          lengths[doc] - (cp_rank + 2) * chunk + within)
    if pack_offsets:
        pos = pos + cu[:-1][doc]
    return pos


@functools.cache  # a memo of a fixed property of megatron-core's functions, no state of any run or group
def _takes(function: Any, name: str) -> bool:
    """Whether ``function`` has a parameter ``name`` (megatron-core renamed some between releases)."""
    return name in inspect.signature(function).parameters


class _NextCallRows:
    """The freqs rows of one call, for the call right after it only (see the module doc)."""

    def __init__(self) -> None:
        self._entry: tuple | None = None

    @staticmethod
    def _key(cu_seqlens: torch.Tensor, freqs: torch.Tensor, tokens: int, cp_size: int, cp_rank: int) -> tuple:
        return (cu_seqlens.data_ptr(), cu_seqlens._version, tuple(cu_seqlens.shape), freqs.data_ptr(),
                freqs._version, tuple(freqs.shape), tokens, cp_size, cp_rank)

    def take(self, cu_seqlens: torch.Tensor, freqs: torch.Tensor, tokens: int, cp_size: int,
             cp_rank: int) -> torch.Tensor | None:
        """The rows kept by the previous call when it had these very tensors and values; forgets them."""
        entry, self._entry = self._entry, None
        if entry is None:
            return None
        cu_ref, freqs_ref, key, rows = entry
        if cu_ref() is not cu_seqlens or freqs_ref() is not freqs:
            return None
        return rows if key == self._key(cu_seqlens, freqs, tokens, cp_size, cp_rank) else None

    def forget(self) -> None:
        """Drop what the previous call kept (a call in between that did not take it)."""
        self._entry = None

    def keep(self, cu_seqlens: torch.Tensor, freqs: torch.Tensor, tokens: int, cp_size: int, cp_rank: int,
             rows: torch.Tensor) -> None:
        self._entry = (weakref.ref(cu_seqlens), weakref.ref(freqs),
                       self._key(cu_seqlens, freqs, tokens, cp_size, cp_rank), rows)


def packed_rope(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, *, cp_size: int, cp_rank: int,
                rotary_interleaved: bool = False, mla_rotary_interleaved: bool = False,
                mscale: float = 1.0, next_call: _NextCallRows | None = None) -> torch.Tensor:
    """Megatron-Core's ``_apply_rotary_pos_emb_thd`` (``t``: ``[t, h, d]``, ``freqs``: ``[s, 1, 1, d_rot]``),
    same result, no host synchronisation. ``mla_rotary_interleaved`` is megatron-core 0.16's
    ``multi_latent_attention`` flag of the same meaning. ``next_call``: reuse the previous call's freqs rows
    when it had the same tensors, and keep this call's for the next one (the router passes its own)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd as bshd

    tokens = t.shape[0]
    rows = next_call.take(cu_seqlens, freqs, tokens, cp_size, cp_rank) if next_call is not None else None
    if rows is None:
        pos = thd_rope_positions(cu_seqlens, tokens, cp_size, cp_rank,
                                 pack_offsets=freqs.dim() >= 1 and freqs.shape[0] == cp_size * tokens)
        rows = freqs.index_select(0, pos.to(freqs.device))
        if next_call is not None:
            next_call.keep(cu_seqlens, freqs, tokens, cp_size, cp_rank, rows)
    mla = "mla_rotary_interleaved" if _takes(bshd, "mla_rotary_interleaved") else "multi_latent_attention"
    return bshd(t.unsqueeze(1), rows, rotary_interleaved=rotary_interleaved, mscale=mscale,
                **{mla: mla_rotary_interleaved}).squeeze(1)


def _serves(cu_seqlens: Any, config: Any, cp_group: Any) -> bool:
    """Whether Megatron-Core would take its unfused THD path for this call (and a CP group is given)."""
    return (cu_seqlens is not None and cp_group is not None
            and not getattr(config, "apply_rope_fusion", False))


def _make_router(original: Any) -> Any:
    # megatron-core 0.19 takes mla_rotary_interleaved (default False, None: the config's
    # multi_latent_attention); 0.16 has no such argument and always uses multi_latent_attention.
    has_mla_arg = _takes(original, "mla_rotary_interleaved")
    next_call = _NextCallRows()  # the queries' freqs rows, for the keys' call right after

    @functools.wraps(original, assigned=("__name__", "__qualname__"))  # keeps its module: who routes
    def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, config: Any, cu_seqlens: Any = None,
                             mscale: float = 1.0, cp_group: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Megatron-Core's ``apply_rotary_pos_emb``; THD tensors on the unfused path go to
        :func:`packed_rope` (same result, no host synchronisation)."""
        if args or set(kwargs) - {"mla_rotary_interleaved"} or not _serves(cu_seqlens, config, cp_group):
            next_call.forget()  # only the very next call may reuse rows
            return original(t, freqs, config, cu_seqlens, mscale, cp_group, *args, **kwargs)
        mla = kwargs.get("mla_rotary_interleaved", False) if has_mla_arg else None
        if mla is None:
            mla = getattr(config, "multi_latent_attention", False)
        return packed_rope(t, cu_seqlens, freqs, cp_size=cp_group.size(), cp_rank=cp_group.rank(),
                           rotary_interleaved=config.rotary_interleaved, mla_rotary_interleaved=mla,
                           mscale=mscale, next_call=next_call)

    apply_rotary_pos_emb.__dict__[_MARK] = True
    apply_rotary_pos_emb.__dict__["original"] = original
    return apply_rotary_pos_emb


class _Group:
    """A CP group of the given size and rank, as far as the THD RoPE asks (for the self-check)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def check_matches_megatron() -> None:
    """Raise RuntimeError unless :func:`packed_rope` equals this Megatron-Core's ``_apply_rotary_pos_emb_thd``
    on small CPU cases (CP 1 and 2, per-document and whole-pack freqs): a guard against a release that
    changes the positions it picks."""
    from megatron.core.models.common.embeddings import rope_utils

    lengths = [4, 12, 8]
    cu = torch.tensor([0, 4, 16, 24], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    for cp, rank in ((1, 0), (2, 1)):
        t = torch.randn(sum(lengths) // cp, 2, 8, generator=g, dtype=torch.float64)
        for rows in (max(lengths) + 1, sum(lengths)):
            freqs = torch.rand(rows, 1, 1, 8, generator=g, dtype=torch.float64) * 10
            want = rope_utils._apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=_Group(cp, rank))
            got = packed_rope(t, cu, freqs, cp_size=cp, cp_rank=rank)
            if not torch.equal(got, want):
                raise RuntimeError("this megatron-core's THD RoPE picks other positions than megatron_tasp's "
                                   "packed RoPE (checked against 0.16 and 0.19): do not route it; use "
                                   "megatron-core 0.19")


def _callers() -> list[Any]:
    """The Megatron-Core modules whose ``apply_rotary_pos_emb`` is routed: attention, and multi-latent attention
    when this release has it (each gets its own router, so the key call reuses only its own module's rows)."""
    import importlib

    modules = [importlib.import_module(_ATTENTION)]
    try:
        mla = importlib.import_module(_MLA)
    except Exception as exc:  # noqa: BLE001 - a release without MLA, or one whose MLA module fails to import
        logger.debug("multi-latent attention's RoPE is not routed: %s", exc)
        return modules
    if getattr(mla, "apply_rotary_pos_emb", None) is not None:
        modules.append(mla)
    return modules


def install_thd_rope() -> bool:
    """Route the THD RoPE calls of Megatron-Core's attention (and multi-latent attention) through
    :func:`packed_rope` (idempotent; True when newly installed anywhere). Raises RuntimeError when the attention
    module has no ``apply_rotary_pos_emb`` to route or this Megatron-Core's THD RoPE computes something else
    (:func:`check_matches_megatron`)."""
    modules = _callers()
    if getattr(modules[0], "apply_rotary_pos_emb", None) is None:
        raise RuntimeError(f"{_ATTENTION} has no apply_rotary_pos_emb (megatron-core 0.16-0.19 layout expected): "
                           "packed RoPE cannot be routed; use megatron-core 0.19")
    todo = [m for m in modules if not getattr(m.apply_rotary_pos_emb, _MARK, False)]
    if not todo:
        return False
    check_matches_megatron()
    routers = [_make_router(m.apply_rotary_pos_emb) for m in todo]  # all built before any is installed
    for module, router in zip(todo, routers):
        module.apply_rotary_pos_emb = router
    logger.info("packed (THD) RoPE runs without host synchronisation (megatron_tasp.megatron.thd_rope)")
    return True


def uninstall_thd_rope() -> None:
    """Undo :func:`install_thd_rope` (tests)."""
    for module in _callers():
        current = getattr(module, "apply_rotary_pos_emb", None)
        if getattr(current, _MARK, False):
            module.apply_rotary_pos_emb = current.original


__all__ = ["check_matches_megatron", "install_thd_rope", "packed_rope", "thd_rope_positions", "uninstall_thd_rope"]
