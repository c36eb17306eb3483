"""Cross-rank agreement: the first call of a shape checks, in ONE all-reduce, that every CP rank runs the
same call, and makes every rank raise when they do not.

Compared: local length, batch, query heads, KV heads, head dim, dtype, causal, and a stable digest of the
effective options (softmax scale and the compute-only switch included). A rank whose own inputs or options
were rejected still takes part, flagging itself, so its peers raise too instead of waiting in the exchange.

Scope of the guarantee: the check runs when a signature is first seen (one all-reduce; later calls of it cost
nothing). Ranks that diverge only after every rank has compiled a signature (one rank's later call has another
shape, or inputs it rejects, while its peers repeat a cached one) enter different collectives: that breaks
the run (gloo aborts, NCCL may hang) instead of raising. Every CP rank must make the same sequence of calls, as
Megatron's layers do; a per-call check would cost a collective per layer call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib

import torch
import torch.distributed as dist

from megatron_tasp.engine.errors import TaspConfigError
from megatron_tasp.options import TaspOptions
from megatron_tasp.topology import Topology

FIELDS = ("local length", "batch", "query heads", "KV heads", "head dim", "dtype", "causal", "options")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # codes 1..4; others hashed


def dtype_code(dtype: torch.dtype) -> int:
    """A number naming ``dtype`` identically in every process."""
    if dtype in _DTYPES:
        return _DTYPES.index(dtype) + 1
    return 100 + zlib.crc32(str(dtype).encode()) % 100_000


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code - 1]).replace("torch.", "") if 1 <= code <= len(_DTYPES) else f"dtype #{code}"


def options_digest(options: TaspOptions, scale: float, compute_only: bool) -> int:
    """A stable 56-bit digest of the effective options (the same value in every process; a Topology counts
    by its content, not by the file it was read from)."""
    topo = options.topology
    if isinstance(topo, Topology):
        options = options.replace(topology=dataclasses.replace(topo, source="", description=""))
    text = repr((dataclasses.astuple(options), float(scale), compute_only))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")


def signature(q: torch.Tensor, k: torch.Tensor, causal: bool, digest: int) -> tuple[int, ...]:
    """What every rank must agree on, as integers in the order of :data:`FIELDS`."""
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], dtype_code(q.dtype), int(bool(causal)),
            digest)


def agree(group: dist.ProcessGroup, n: int, rank: int, sig: tuple[int, ...] | None, device: torch.device,
          problem: BaseException | None, describe: str = "") -> None:
    """One all-reduce (MAX of the values and of their negatives, plus one flag per rank that failed its own
    checks). Raises ``problem`` on the rank that has one and TaspConfigError naming what differs (or which
    ranks failed) on every other rank. ``describe`` names this rank's options in the message."""
    values = list(sig) if sig is not None else [0] * len(FIELDS)
    failed = [0] * n
    if problem is not None:
        failed[rank] = 1
    t = torch.tensor(values + [-x for x in values] + failed, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    got = t.tolist()
    m = len(FIELDS)
    hi, lo, bad = got[:m], [-x for x in got[m:2 * m]], got[2 * m:]
    if problem is not None:
        raise problem
    if any(bad):
        ranks = [r for r, b in enumerate(bad) if b]
        raise TaspConfigError(f"CP rank(s) {ranks} rejected their inputs or options (see the error raised there); "
                              "every CP rank must call TASP attention with the same shapes and options")
    differ = []
    for i, name in enumerate(FIELDS):
        if hi[i] == lo[i]:
            continue
        if name == "dtype":
            differ.append(f"dtype ({_dtype_name(lo[i])} .. {_dtype_name(hi[i])}; this rank "
                          f"{_dtype_name(values[i])})")
        elif name == "options":
            differ.append(f"the effective TASP options (this rank: {describe})")
        elif name == "causal":
            differ.append(f"causal (this rank {bool(values[i])})")
        else:
            differ.append(f"{name} ({lo[i]} .. {hi[i]}; this rank {values[i]})")
    if differ:
        hint = (" TASP needs Megatron's even split: the sequence length divisible by 2*CP (causal) or by CP "
                "(no mask)." if hi[0] != lo[0] else "")
        raise TaspConfigError("CP ranks disagree on " + ", ".join(differ) + "; every CP rank must call TASP "
                              "attention with the same shapes, dtype, mask and options." + hint)


def boundaries_digest(*bounds: tuple[int, ...]) -> int:
    """A stable 56-bit digest of packed-document boundaries (the same value in every process)."""
    return int.from_bytes(hashlib.blake2b(repr(bounds).encode(), digest_size=7).digest(), "big")


def agree_boundaries(group: dist.ProcessGroup, digest: int, device: torch.device,
                     problem: BaseException | None) -> None:
    """One all-reduce checking that every CP rank passed the same document boundaries (``digest``); raises
    ``problem`` on a rank whose own boundaries were rejected, TaspConfigError on every other rank."""
    t = torch.tensor([digest, -digest, int(problem is not None)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    hi, neg_lo, failed = t.tolist()
    if problem is not None:
        raise problem
    if failed:
        raise TaspConfigError("a CP rank rejected its document boundaries or this packed-documents call (see the "
                              "error raised there); every CP rank must pass the same cu_seqlens_padded / cu_seqlens "
                              "and be able to run the same options")
    if hi != -neg_lo:
        raise TaspConfigError("CP ranks disagree on the document boundaries (cu_seqlens_padded / cu_seqlens); "
                              "every CP rank must pass the same global boundaries")
