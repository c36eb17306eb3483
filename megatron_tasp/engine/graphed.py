"""A compiled call's forward and backward replayed from CUDA graphs (``TaspOptions.cuda_graphs``).

Short sequences are bound by the host: a CP=2 call launches ~30 kernels and the exchange's posts, ~2 ms of host
time against ~0.7 ms of GPU work at 2K tokens per GPU (docs/PERFORMANCE.md). A :class:`GraphedCall` runs the
first call of a signature eagerly (it compiles, warms the kernels and the process group), then warms the
forward and backward on static buffers and captures each in a CUDA graph (one memory pool for both). Every
later call copies its inputs into the static buffers, replays, and copies the outputs out: every layer of a
model replays the same graph, so nothing handed out may live in the graph's memory (the next layer's replay
overwrites it). The backward copies in what the forward saved (q, k, v, out, lse, kept KV) for the same reason.

When the current stream is being captured already (Megatron-LM's own per-layer graphs), or under
``torch.inference_mode``, the call runs eagerly (the first records it; the second would make the static buffers
inference tensors). Packed-document calls are never graphed (their layout depends on boundary values read to
the host). A capture that fails on any rank (the first NCCL capture of a process has failed with
``cudaErrorStreamCaptureInvalidated`` on some machines, docs/PERFORMANCE.md) leaves every rank of the group
eager for that signature: the ranks agree on the outcome with one all-reduce, so none replays an exchange its
peer does not post. What it holds: one graph pool per signature (shapes, dtypes, options) with one call's
workspace plus static copies of q, k, v, dout, out, lse, dq, dk, dv and any kept KV, as long as the plan cache
keeps the call. The static buffers are shared by every call of the signature, so calls of one signature must
come from one thread and one stream (as Megatron's layers do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.engine.backward import backward
from megatron_tasp.engine.cache import PLAN_CACHE
from megatron_tasp.engine.compiled import CompiledCall, collective_device
from megatron_tasp.engine.forward import forward

__all__ = ["CudaGraphCapturer", "GraphedCall", "graphed"]

logger = logging.getLogger(__name__)

WARMUP = 2  # eager forward+backward runs on the capture stream before capturing (torch's advice: >= 1)


class CudaGraphCapturer:
    """Captures callables into CUDA graphs on one stream of ``device``, all in one memory pool."""

    def __init__(self, device: torch.device):
        self.stream = PLAN_CACHE.streams.get(device, "graphs")
        self.pool: Any = None

    def warm(self, fn: Callable[[], Any], times: int) -> None:
        """Run ``fn`` ``times`` times on the capture stream (allocations and lazy initialisation happen here,
        not during the capture) and wait for it."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(times):
                fn()
        self.stream.synchronize()

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """(replay, the static outputs of ``fn``): ``fn`` captured on the warm-up stream (NCCL may register new
        buffers for a new stream inside the capture otherwise); thread_local, because the process group's
        watchdog thread queries events meanwhile."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            outs = fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, outs


def _can_capture(device: torch.device) -> bool:
    """Whether a call may capture or replay now: not inside another capture, which records the eager call, and
    not under ``torch.inference_mode`` (static buffers made there would be inference tensors that later calls
    cannot copy into)."""
    if torch.is_inference_mode_enabled():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _capturer(device: torch.device) -> Any:
    """What captures a call's graphs now (None: the call runs eagerly)."""
    return _new_capturer(device) if _can_capture(device) else None


def _new_capturer(device: torch.device) -> Any:
    """A capturer for ``device`` (None off CUDA). The one place the engine makes one: tests replace this
    function to run the graphed path on CPU with a stand-in."""
    return CudaGraphCapturer(device) if device.type == "cuda" else None


def _clone(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.clone()


class GraphedCall:
    """Forward and backward of one :class:`CompiledCall` from CUDA graphs (see the module doc)."""

    def __init__(self, call: CompiledCall):
        self.call = call
        self.calls = 0
        self.disabled = False  # a capture failed on some rank: eager for good
        self.replay_fwd: Callable[[], None] | None = None
        self.replay_bwd: Callable[[], None] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_backward: bool = True):
        """(out, lse, kernel contexts, kept KV, replayed): eager on the first call of the signature (and
        whenever nothing can capture, e.g. inside another capture), replayed afterwards. Without
        ``need_backward`` the kept KV is not copied out (nothing will read it)."""
        self.calls += 1
        live = not self.disabled and _can_capture(q.device)
        if live and self.replay_fwd is None and self.calls >= 2:
            capturer = _capturer(q.device)  # made only to capture, not on every replayed call
            if capturer is not None:
                self._capture(capturer, q, k, v)
        if not live or self.replay_fwd is None:
            return (*forward(self.call, q, k, v), False)
        for dst, src in zip(self.inputs, (q, k, v)):
            dst.copy_(src)
        self.replay_fwd()
        kept = None if self.kept is None or not need_backward else [_clone(b) for b in self.kept]
        return self.out.clone(), self.lse.clone(), self.kctx, kept, True

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, kept: list | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv of a replayed forward: its saved tensors copied into the static buffers, replayed."""
        if self.kept is not None and kept is None:  # a second backward (retain_graph): exchange KV again, eagerly
            return backward(self.call, dout, q, k, v, out, lse, self.kctx, None)
        for dst, src in zip((*self.inputs, self.out, self.lse, self.dout), (q, k, v, out, lse, dout)):
            dst.copy_(src)
        for dst, src in zip(self.kept or (), kept or ()):
            if dst is not None:
                dst.copy_(src)
        self.replay_bwd()
        return self.grads[0].clone(), self.grads[1].clone(), self.grads[2].clone()

    def _capture(self, capturer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        call = self.call
        self.inputs = [x.detach().clone(memory_format=torch.contiguous_format) for x in (q, k, v)]
        self.dout = torch.zeros(q.shape, dtype=q.dtype, device=q.device)

        def both() -> None:
            out, lse, kctx, kept = forward(call, *self.inputs)
            backward(call, self.dout, *self.inputs, out, lse, kctx, kept)

        capturer.warm(both, WARMUP)  # runs the exchanges: a failure here is an eager call's failure, raised as is
        problem: BaseException | None = None
        try:  # a capture runs nothing, so a rank whose capture fails leaves no exchange unmatched
            replay_fwd, (out, lse, kctx, kept) = capturer.capture(lambda: forward(call, *self.inputs))
            replay_bwd, grads = capturer.capture(lambda: backward(call, self.dout, *self.inputs, out, lse, kctx, kept))
        except Exception as exc:  # noqa: BLE001 - agreed on below; every rank then stays eager
            problem = exc
        if not self._all_captured(problem is None):
            self.disabled = True
            self.inputs = self.dout = None  # eager from now on: nothing needs the static buffers
            logger.warning("TASP CUDA graphs: capture failed on %s (%s); this call shape stays eager",
                           "this rank" if problem is not None else "another CP rank",
                           "" if problem is None else f"{type(problem).__name__}: {str(problem)[:200]}")
            return
        self.out, self.lse, self.kctx, self.kept, self.grads = out, lse, kctx, kept, grads
        self.replay_fwd, self.replay_bwd = replay_fwd, replay_bwd

    def _all_captured(self, ok: bool) -> bool:
        """True when every rank of the call's group captured both graphs (one all-reduce)."""
        group = self.call.group
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=collective_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item()) == 0


def graphed(call: Any) -> GraphedCall | None:
    """The call's :class:`GraphedCall` when its options ask for CUDA graphs (CP > 1), else None."""
    if not isinstance(call, CompiledCall) or not call.cuda_graphs:
        return None
    if call.graphed is None:
        call.graphed = GraphedCall(call)
    return call.graphed
