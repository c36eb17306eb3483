"""Channels: the flat buffers pieces travel in, split into lanes, the side stream of a call's first exchange,
and the second compute stream a call's own block may run on beside the remote blocks (:func:`fork`).

Each channel (KV forward, KV backward, dK/dV backward) owns two flat buffers used alternately (double
buffering), or one per step when the forward keeps every received piece for the backward. The first exchange
of a call reads only the call's inputs and receives into a buffer no earlier kernel of the call reads:
:func:`detached` issues it on a side stream ordered after a :func:`mark` recorded at the call's start, so the
host can queue the first (local) kernel before spending its time on packing and posting the transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from megatron_tasp.engine.exchange import Pending, Transport


class Channel:
    """A double-buffered stream of flat buffers moving along the rings, split into lanes.

    Lane j holds sub-piece j of every ring's piece, laid out one lane after another in the flat
    buffer; each lane has its own transport (its own message sizes) and is sent as a separate
    message, so a consumer can start on lane 0 while later lanes are still in flight.
    ``buffers`` lets a channel borrow existing flat buffers of the right size and dtype. With
    ``depth`` m > 2 the channel cycles through m buffers, so the pieces of m - 1 consecutive steps
    stay intact (the forward keeps every received piece this way for the backward).
    """

    def __init__(self, transports: Transport | Sequence[Transport], dtype: torch.dtype, device: torch.device,
                 what: str, buffers: Sequence[torch.Tensor] | None = None, role: str = "kv", depth: int = 2):
        self.transports = [transports] if isinstance(transports, Transport) else list(transports)
        self.lane_offsets, acc = [], 0
        for t in self.transports:
            self.lane_offsets.append(acc)
            acc += t.layout.numel
        self.numel = acc
        if buffers is None:
            alloc = getattr(self.transports[0], "alloc", None)
            if alloc is not None:
                if depth != 2:
                    raise ValueError(f"transport {self.transports[0].name!r} has two persistent buffers per "
                                     f"role; a channel of depth {depth} needs per-call buffers")
                buffers = alloc(acc, dtype, device, role)
            else:
                buffers = [torch.empty(acc, dtype=dtype, device=device) for _ in range(depth)]
        if len(buffers) < 2 or any(b.numel() != acc or b.dtype != dtype for b in buffers):
            raise ValueError(f"a channel needs two or more flat {dtype} buffers of {acc} elements")
        self.buffers = list(buffers)
        self.what = what
        self.cur = 0

    @property
    def lanes(self) -> int:
        """Number of lanes (messages per step)."""
        return len(self.transports)

    @property
    def current(self) -> torch.Tensor:
        """The buffer holding this step's pieces."""
        return self.buffers[self.cur]

    @property
    def other(self) -> torch.Tensor:
        """The buffer the next step receives into."""
        return self.buffers[(self.cur + 1) % len(self.buffers)]

    def lane(self, flat: torch.Tensor, j: int) -> torch.Tensor:
        """Lane j's slice of a flat buffer of this channel."""
        return flat[self.lane_offsets[j]:self.lane_offsets[j] + self.transports[j].layout.numel]

    def views(self, j: int = 0, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Piece views of lane j of the current buffer (or of ``flat``, a buffer of this channel's size)."""
        return self.transports[j].layout.views(self.lane(self.current if flat is None else flat, j))

    def start_lane(self, step: int, j: int) -> Pending:
        """Send lane j of the current buffer and receive lane j of the other one."""
        t = self.transports[j]
        lane = f" lane {j}" if self.lanes > 1 else ""
        label = f"{self.what} step {step}{lane} (CP group ranks {t.group_ranks}, rank {t.rank})"
        return t.start(self.lane(self.current, j), self.lane(self.other, j), label)

    def start(self, step: int) -> list[Pending]:
        """Start every lane (one message per lane, in lane order); ``advance()`` once all are posted."""
        return [self.start_lane(step, j) for j in range(self.lanes)]

    def advance(self) -> None:
        """Make the buffer being received into the current one."""
        self.cur = (self.cur + 1) % len(self.buffers)


def mark(device: torch.device) -> torch.cuda.Event | None:
    """An event on the current CUDA stream (None on CPU): what :func:`detached` work waits for."""
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


@contextlib.contextmanager
def detached(device: torch.device, after: torch.cuda.Event | None,
             side: torch.cuda.Stream | None) -> Iterator[None]:
    """Issue the enclosed work (packing, an exchange's first transfer) on a side stream that waits only
    for ``after``, so that the host can queue compute on the current stream first and post the transfer
    while that compute runs. Waiting on the returned ``Pending`` orders the current stream after the
    transfer as usual. ``side`` is that stream (the call's, from the cache's stream pool). A no-op on CPU or
    when ``after`` is None.

    Memory rule (the caching allocator is stream-ordered): every tensor the enclosed work writes or
    sends must be allocated BEFORE ``after`` was recorded, or on the side stream and used only there;
    a block allocated on the current stream after the mark may still be in use by the kernels queued
    since (a kernel's freed workspace, say), which the side stream does not wait for."""
    if device.type != "cuda" or after is None or side is None:
        yield
        return
    side.wait_event(after)
    with torch.cuda.stream(side):
        yield


def fork(device: torch.device, stream: torch.cuda.Stream | None) -> torch.cuda.Stream | None:
    """``stream``, ordered after everything queued so far on the current stream, for work to run BESIDE what the
    current stream does next (a call's own block beside its remote blocks: the per-row kernels of one fill the
    other's tails; measured on the H200 for a CP=2 rank of packed documents: ~0.2 ms of its ~7.7 ms per
    fwd+bwd).
    None (run on the current stream) on CPU, without a stream, or while the current stream is being captured
    into a CUDA graph. Pair with :func:`join` before anything on the current stream reads the results.

    Memory rule (the caching allocator is stream-ordered): the work may read tensors of the current stream that
    stay referenced until :func:`join`; what it allocates belongs to ``stream``, so :func:`join` marks its
    results as used by the current stream. Every later use of ``stream`` starts with a fork, so a block it
    reuses was released by work already ordered before it."""
    if device.type != "cuda" or stream is None or torch.cuda.is_current_stream_capturing():
        return None
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def join(stream: torch.cuda.Stream | None, results: Iterable[Any]) -> None:
    """Order the current stream after ``stream`` (from :func:`fork`; None: nothing to do) and mark every tensor
    in ``results`` (nested in tuples, lists, dict values and dataclass fields, e.g. a kernel's context) as used
    by it."""
    if stream is None:
        return
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    todo, seen = list(results), set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            if x.is_cuda:
                x.record_stream(current)
        elif isinstance(x, (tuple, list)):
            todo.extend(x)
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            todo.extend(getattr(x, f.name) for f in dataclasses.fields(x))


def beside(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """The context that runs work on ``stream`` (from :func:`fork`), or on the current stream when it is None."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
