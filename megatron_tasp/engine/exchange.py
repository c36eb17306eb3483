"""Exchange layer: move the pieces of one step between CP ranks (torch.distributed).

Knows nothing about attention: it moves k flat-packed pieces, piece i to ``send_peers[i]`` and from
``recv_peers[i]``. Strategies are pluggable (a registry, not an if/elif):

- ``p2p``: one batch of k isend/irecv pairs (works for every ring set, multi-node included);
- ``a2a``: one ``all_to_all_single`` per step (each peer gets at most one piece per step, which holds
  for every set of orthogonal rings);
- ``symm``: copy-engine pushes into the peers' symmetric-memory buffers (one NVLink node);
- ``none``: no communication (benchmarks: the compute-only bound).

Ordering. Channels (:mod:`megatron_tasp.engine.channel`) hold the buffers; exchanges are *issued from the
compute stream*: NCCL makes its own stream wait for everything already queued on the issuing stream, so a
receive into the buffer that the previous step's kernels read is ordered after those kernels, and ``wait()``
makes the compute stream (never the host) wait for the transfer. The one exception is the first exchange of
a call (see ``channel.detached``). No host synchronisation happens inside the step loop on GPU. On gloo
(CPU) ``wait`` blocks with a timeout (``TaspOptions.timeout_s``) and names the CP group and step when a peer
never answers.

State: nothing here is global. What outlives a call (the persistent symmetric-memory buffers of a group, the
side and copy streams) lives in pools owned by the engine's plan cache (:mod:`megatron_tasp.engine.cache`)
and reaches the transports through :class:`ExchangeSettings`.
"""

from __future__ import annotations

import abc
import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist


class ExchangeTimeout(RuntimeError):
    """A peer did not answer within the timeout."""


class StreamPool:
    """CUDA streams by (device, purpose), created on first use and reused by every call (owned by the cache)."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, object], torch.cuda.Stream] = {}

    def get(self, device: torch.device, purpose: object) -> torch.cuda.Stream:
        """The stream of ``device`` for ``purpose`` (e.g. "side", or a ring index for symm copies), never one
        that another purpose of this pool already holds: torch hands out its pool streams round-robin (32 per
        priority), and two purposes on one stream would run one after the other."""
        key = (str(device), purpose)
        s = self._streams.get(key)
        if s is None:
            taken = {x.cuda_stream for (d, _), x in self._streams.items() if d == str(device)}
            for _ in range(64):  # two rounds of the pool
                s = torch.cuda.Stream(device=device)
                if s.cuda_stream not in taken:
                    break
            self._streams[key] = s
        return s


class SymmPool:
    """Persistent symmetric-memory buffers of one process group by (device, dtype, role), grown on demand.

    Owned by the group's entry in the plan cache, so it lives exactly as long as the group's plans."""

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[int, torch.Tensor, object]] = {}
        self.by_ptr: dict[int, tuple[torch.Tensor, object]] = {}
        self.retired: list[torch.Tensor] = []  # outgrown buffers stay allocated: peers may still address them

    def buffers(self, group, device: torch.device, dtype: torch.dtype, numel: int, role: str) -> list[torch.Tensor]:
        """Two flat buffers of ``numel`` elements (collective on first use or growth: a rendezvous)."""
        # optional torch module (absent on some builds): imported where 'symm' is first used
        import torch.distributed._symmetric_memory as symm_mem

        key = (str(device), dtype, role)
        entry = self.entries.get(key)
        if entry is None or entry[0] < 2 * numel:
            cap = max(2 * numel, 2 * entry[0] if entry else 0)
            base = symm_mem.empty(cap, dtype=dtype, device=device)
            pg = group if group is not None else dist.group.WORLD
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                try:
                    symm_mem.enable_symm_mem_for_group(pg.group_name)
                except Exception:  # noqa: BLE001 - newer torch: enabled by default
                    pass
            handle = symm_mem.rendezvous(base, pg)
            if entry is not None:
                self.retired.append(entry[1])
            entry = self.entries[key] = (cap, base, handle)
            self.by_ptr[base.untyped_storage().data_ptr()] = (base, handle)
        base = entry[1]
        return [base[:numel], base[numel:2 * numel]]

    def locate(self, t: torch.Tensor) -> tuple[object, int]:
        """(handle, element offset in the symmetric allocation) of a tensor carved from a pool buffer."""
        found = self.by_ptr.get(t.untyped_storage().data_ptr())
        if found is None:
            raise ValueError("transport 'symm' can only move buffers it allocated (Channel over a symm transport)")
        base, handle = found
        return handle, (t.data_ptr() - base.data_ptr()) // t.element_size()


@dataclass(frozen=True)
class ExchangeSettings:
    """What a transport needs besides its peers: from the call's options and the plan cache's pools."""

    timeout_s: float = 300.0  # a CPU (gloo) wait, or a symm signal wait, gives up after this
    direct_collectives: bool = True  # post all-to-alls on the group's backend object (skips the dispatcher)
    streams: StreamPool = field(default_factory=StreamPool)
    symm_pool: SymmPool | None = None  # the group's persistent buffers (transport 'symm' only)


@dataclass(frozen=True)
class PieceLayout:
    """Shapes of the k pieces packed one after another in a flat buffer."""

    shapes: tuple[tuple[int, ...], ...]

    @cached_property
    def sizes(self) -> list[int]:
        """Elements per piece."""
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            out.append(n)
        return out

    @cached_property
    def offsets(self) -> list[int]:
        """Start of each piece in the flat buffer."""
        offs, acc = [], 0
        for n in self.sizes:
            offs.append(acc)
            acc += n
        return offs

    @cached_property
    def numel(self) -> int:
        """Elements of the whole flat buffer."""
        return sum(self.sizes)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Piece views of ``flat`` (contiguous, shaped)."""
        return [flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]


class Pending:
    """An exchange in flight; ``wait()`` returns the received flat buffer."""

    def __init__(self, works: list, recv: torch.Tensor, label: str, finish=None, timeout_s: float = 300.0):
        self._works = works
        self._timeout_s = timeout_s
        self._recv = recv
        self._label = label
        self._finish = finish
        self._done = False

    def wait(self) -> torch.Tensor:
        """Order the current stream after the transfer (GPU) or block until it is done (CPU)."""
        if self._done:
            return self._recv
        timeout = None if self._recv.is_cuda else datetime.timedelta(seconds=self._timeout_s)
        for w in self._works:
            try:
                if timeout is None:
                    w.wait()
                else:
                    w.wait(timeout)
            except RuntimeError as exc:
                raise ExchangeTimeout(f"TASP exchange failed or timed out at {self._label}: {exc}") from exc
        if self._finish is not None:
            self._finish()
        self._done = True
        return self._recv


class Transport(abc.ABC):
    """Moves piece i to ``send_peers[i]`` and receives piece i from ``recv_peers[i]`` (group ranks)."""

    name = "base"
    #: posting allocates staging tensors (then the post must stay on the compute stream, see ``detached``)
    allocates_on_start = False

    def __init__(self, group: dist.ProcessGroup | None, send_peers: Sequence[int], recv_peers: Sequence[int],
                 layout: PieceLayout, settings: ExchangeSettings):
        self.group = group
        self.settings = settings
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.send_peers = list(send_peers)
        self.recv_peers = list(recv_peers)
        self.layout = layout
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.world))
        self.group_ranks = ranks

    @abc.abstractmethod
    def start(self, send: torch.Tensor, recv: torch.Tensor, label: str) -> Pending:
        """Post the sends of ``send`` (flat) and the receives into ``recv`` (flat)."""


class P2PTransport(Transport):
    """One batch of k isend/irecv pairs per step."""

    name = "p2p"

    def start(self, send: torch.Tensor, recv: torch.Tensor, label: str) -> Pending:
        ops = []
        for piece, peer in zip(self.layout.views(send), self.send_peers):
            ops.append(dist.P2POp(dist.isend, piece, self.group_ranks[peer], self.group))
        for piece, peer in zip(self.layout.views(recv), self.recv_peers):
            ops.append(dist.P2POp(dist.irecv, piece, self.group_ranks[peer], self.group))
        return Pending(dist.batch_isend_irecv(ops), recv, label, timeout_s=self.settings.timeout_s)


class A2ATransport(Transport):
    """One ``all_to_all_single`` per step; pieces are staged in peer order when the ring order differs."""

    name = "a2a"

    def __init__(self, group, send_peers, recv_peers, layout, settings):
        super().__init__(group, send_peers, recv_peers, layout, settings)
        if len(set(send_peers)) != len(send_peers) or len(set(recv_peers)) != len(recv_peers):
            raise ValueError("a2a transport needs at most one piece per peer per step; use transport='p2p'")
        sizes = layout.sizes
        self.in_splits = [0] * self.world
        self.out_splits = [0] * self.world
        for i, p in enumerate(send_peers):
            self.in_splits[p] = sizes[i]
        for i, p in enumerate(recv_peers):
            self.out_splits[p] = sizes[i]
        self.send_order = sorted(range(len(send_peers)), key=lambda i: send_peers[i])
        self.recv_order = sorted(range(len(recv_peers)), key=lambda i: recv_peers[i])
        self.recv_offsets: dict[int, int] = {}  # where ring i's piece lands in the peer-ordered output
        acc = 0
        for i in self.recv_order:
            self.recv_offsets[i] = acc
            acc += sizes[i]
        ident = list(range(len(send_peers)))
        self.stage_send = self.send_order != ident
        self.stage_recv = self.recv_order != ident
        self.allocates_on_start = self.stage_send or self.stage_recv
        self._direct: dict[str, object] = {}  # device type -> backend (skips the dispatcher, ~25 us a call)

    def _post(self, out: torch.Tensor, send: torch.Tensor):
        be = self._direct.get(out.device.type, False)
        if be is False:
            be = self._direct[out.device.type] = _backend_of(self.group, out.device,
                                                             self.settings.direct_collectives)
        if be is None:
            return dist.all_to_all_single(out, send, self.out_splits, self.in_splits, group=self.group,
                                          async_op=True)
        return be.alltoall_base(out, send, self.out_splits, self.in_splits, _ASYNC_A2A_OPTS)

    def start(self, send: torch.Tensor, recv: torch.Tensor, label: str) -> Pending:
        if self.stage_send:
            pieces = self.layout.views(send)
            send = torch.cat([pieces[i].reshape(-1) for i in self.send_order])
        out = torch.empty_like(recv) if self.stage_recv else recv
        work = self._post(out, send)
        finish = None
        if self.stage_recv:
            def finish() -> None:
                for i, (view, size) in enumerate(zip(self.layout.views(recv), self.layout.sizes)):
                    view.reshape(-1).copy_(out[self.recv_offsets[i]:self.recv_offsets[i] + size])
        return Pending([work], recv, label, finish, self.settings.timeout_s)


# a constant (never written after this): the options object every direct all-to-all is posted with
_ASYNC_A2A_OPTS = dist.AllToAllOptions() if hasattr(dist, "AllToAllOptions") else None
if _ASYNC_A2A_OPTS is not None:
    _ASYNC_A2A_OPTS.asyncOp = True


def _backend_of(group, device: torch.device, direct: bool):
    """The process group's backend object for ``device`` (its ``alltoall_base`` is called directly), or
    None when this torch build does not expose it (then the public ``all_to_all_single`` is used).
    ``direct=False`` (``TaspOptions.direct_collectives``) always uses the public API."""
    if not direct:
        return None
    pg = group if group is not None else dist.group.WORLD
    try:
        be = pg._get_backend(device)
    except Exception:  # noqa: BLE001 - private API: absent or renamed in other torch builds
        return None
    return be if callable(getattr(be, "alltoall_base", None)) and hasattr(dist, "AllToAllOptions") else None


class NoCommTransport(Transport):
    """Benchmarking only: no communication; the received buffer is a local copy of the sent one.

    Runs exactly the kernels, merges and copies of a real schedule, so its time is the compute-only
    bound (what perfect overlap would give). Results are numerically wrong for n > 1 on purpose.
    """

    name = "none"

    def start(self, send: torch.Tensor, recv: torch.Tensor, label: str) -> Pending:
        recv.copy_(send)
        if not recv.is_cuda:
            return Pending([], recv, label, timeout_s=self.settings.timeout_s)
        ev = torch.cuda.Event()  # the copy may run on a side stream (see ``detached``)
        ev.record()
        return _EventPending([ev], recv, label)


class _EventPending(Pending):
    def __init__(self, events: list, recv: torch.Tensor, label: str):
        super().__init__([], recv, label)
        self._events = events

    def wait(self) -> torch.Tensor:
        stream = torch.cuda.current_stream(self._recv.device)
        for ev in self._events:
            stream.wait_event(ev)
        return self._recv


class SymmTransport(Transport):
    """Copy-engine transport on one NVLink node: every piece is pushed straight into the receiving GPU's
    buffer with a peer-to-peer memcpy (no NCCL kernel, no SM used for the transfer).

    Buffers live in PyTorch symmetric memory (one persistent pool per group, dtype and role). Per piece
    and step, on a dedicated stream per ring: tell the ring predecessor that our receive slot is free
    (signal READY, after the kernels that read it), wait for the successor's READY, copy, signal DATA to
    the successor, wait for the predecessor's DATA. The compute stream then waits on an event, never the
    host. A peer that never signals makes the wait kernel trap after ``TaspOptions.timeout_s``.
    """

    name = "symm"
    READY, DATA = 0, 1

    def __init__(self, group, send_peers, recv_peers, layout, settings):
        super().__init__(group, send_peers, recv_peers, layout, settings)
        if len(set(send_peers)) != len(send_peers) or len(set(recv_peers)) != len(recv_peers):
            raise ValueError("symm transport needs at most one piece per peer per step")
        if settings.symm_pool is None:
            raise ValueError("transport 'symm' needs the group's symmetric-memory pool (ExchangeSettings.symm_pool)")
        self.pool = settings.symm_pool
        self.timeout_ms = int(settings.timeout_s * 1000)
        self._views: dict[tuple, torch.Tensor] = {}

    def alloc(self, numel: int, dtype: torch.dtype, device: torch.device, role: str) -> list[torch.Tensor]:
        """Two flat buffers from the symmetric pool (persistent; reused by every call of this shape)."""
        if device.type != "cuda":
            raise ValueError("transport 'symm' needs CUDA devices on one NVLink node; use 'a2a' or 'p2p'")
        return self.pool.buffers(self.group, device, dtype, numel, role)

    def _peer_view(self, handle, peer: int, offset: int, size: int, dtype: torch.dtype) -> torch.Tensor:
        key = (id(handle), peer, offset, size, dtype)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = handle.get_buffer(peer, (size,), dtype, offset)
        return v

    def start(self, send: torch.Tensor, recv: torch.Tensor, label: str) -> Pending:
        handle, off = self.pool.locate(recv)
        compute = torch.cuda.current_stream(recv.device)
        events = []
        for i, (dst, src) in enumerate(zip(self.send_peers, self.recv_peers)):
            o, n = self.layout.offsets[i], self.layout.sizes[i]
            stream = self.settings.streams.get(recv.device, i)
            stream.wait_stream(compute)  # the kernels that read our receive slot, and the data to send
            with torch.cuda.stream(stream):
                handle.put_signal(src, self.READY, self.timeout_ms)
                handle.wait_signal(dst, self.READY, self.timeout_ms)
                self._peer_view(handle, dst, off + o, n, recv.dtype).copy_(send[o:o + n], non_blocking=True)
                handle.put_signal(dst, self.DATA, self.timeout_ms)
                handle.wait_signal(src, self.DATA, self.timeout_ms)
                ev = torch.cuda.Event()
                ev.record(stream)
            events.append(ev)
        return _EventPending(events, recv, label)


TRANSPORTS: dict[str, type[Transport]] = {t.name: t for t in (P2PTransport, A2ATransport, NoCommTransport,
                                                              SymmTransport)}


def make_transport(name: str, group, send_peers, recv_peers, layout: PieceLayout,
                   settings: ExchangeSettings) -> Transport:
    """Build a transport by name (``a2a``, ``p2p`` or ``symm``; ``none`` for compute-only benchmarks)."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown TASP transport {name!r}; choose one of {', '.join(sorted(TRANSPORTS))}")
    return TRANSPORTS[name](group, send_peers, recv_peers, layout, settings)
