"""A compiled call's forward and backward replayed from CUDA graphs (``TaspOptions.cuda_graphs``).

Short sequences are bound by the host: a CP=2 call launches ~30 kernels and the exchange's posts, ~2 ms of host
time against ~0.7 ms of GPU work at 2K tokens per GPU (docs/PERFORMANCE.md). A :class:`GraphedCall` runs the
first call of a signature eagerly (it compiles, warms the kernels and the process group), then warms the
forward and backward on static buffers and captures each in a CUDA graph (one memory pool for both). Every
later call copies its inputs into the static buffers, replays, and copies the outputs out: every layer of a
model replays the same graph, so nothing handed out may live in the graph's memory (the next layer's replay
overwrites it). The backward copies in what the forward saved (q, k, v, out, lse, kept KV) for the same reason.

When the current stream is being captured already (Megatron-LM's own per-layer graphs), the call runs eagerly
and that capture records it. Packed-document calls are never graphed (their layout depends on boundary values
read to the host). Where this runs, and the memory it holds: one pool per signature (shapes, dtypes, options),
about one call's workspace, kept as long as the plan cache keeps the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_tasp.engine.backward import backward
from megatron_tasp.engine.cache import PLAN_CACHE
from megatron_tasp.engine.compiled import CompiledCall
from megatron_tasp.engine.forward import forward

__all__ = ["CudaGraphCapturer", "GraphedCall", "graphed"]

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


def _capturer(device: torch.device) -> Any:
    """What captures a call's graphs on ``device`` (None: nothing can, the call runs eagerly). The one place
    the engine picks it: tests replace this function to run the graphed path on CPU with a stand-in."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return CudaGraphCapturer(device)


def _clone(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.clone()


class GraphedCall:
    """Forward and backward of one :class:`CompiledCall` from CUDA graphs (see the module doc)."""

    def __init__(self, call: CompiledCall):
        self.call = call
        self.calls = 0
        self.replay_fwd: Callable[[], None] | None = None
        self.replay_bwd: Callable[[], None] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """(out, lse, kernel contexts, kept KV, replayed): eager on the first call of the signature (and
        whenever nothing can capture, e.g. inside another capture), replayed afterwards."""
        self.calls += 1
        capturer = _capturer(q.device)
        if capturer is not None and self.replay_fwd is None and self.calls >= 2:
            self._capture(capturer, q, k, v)
        if capturer is None or self.replay_fwd is None:
            return (*forward(self.call, q, k, v), False)
        for dst, src in zip(self.inputs, (q, k, v)):
            dst.copy_(src)
        self.replay_fwd()
        kept = None if self.kept is None else [_clone(b) for b in self.kept]
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
        self.inputs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        for dst, src in zip(self.inputs, (q, k, v)):
            dst.copy_(src)
        self.dout = torch.zeros(q.shape, dtype=q.dtype, device=q.device)

        def both() -> None:
            out, lse, kctx, kept = forward(call, *self.inputs)
            backward(call, self.dout, *self.inputs, out, lse, kctx, kept)

        capturer.warm(both, WARMUP)
        self.replay_fwd, (self.out, self.lse, self.kctx, self.kept) = capturer.capture(
            lambda: forward(call, *self.inputs))
        self.replay_bwd, self.grads = capturer.capture(
            lambda: backward(call, self.dout, *self.inputs, self.out, self.lse, self.kctx, self.kept))


def graphed(call: Any) -> GraphedCall | None:
    """The call's :class:`GraphedCall` when its options ask for CUDA graphs (CP > 1), else None."""
    if not isinstance(call, CompiledCall) or not call.cuda_graphs:
        return None
    if call.graphed is None:
        call.graphed = GraphedCall(call)
    return call.graphed
