"""The block-attention interface, input checks and the backend registry.

Layout at this interface (everything else in the package follows it):

* ``q`` ``[b, h, sq, d]``; ``k``/``v`` ``[b, h_kv, sk, d]`` with ``h % h_kv == 0`` (GQA/MQA). Query head ``i``
  reads KV head ``i // (h // h_kv)`` (the convention of Megatron, flash-attn and ``enable_gqa``).
  Inputs may be non-contiguous views (e.g. transposes of Megatron's ``[s, b, h, d]``).
* ``forward`` returns ``out [b, h, sq, d]`` in ``q.dtype`` (possibly a non-contiguous view),
  ``lse [b, h, sq]`` contiguous float32 (natural log; float64 only for float64 inputs) and an opaque ``ctx``.
* ``backward`` takes the MERGED output and lse of these queries over every KV block (the flash-attention ring
  trick), not necessarily this block's own ``forward`` result, and returns ``dq`` shaped like ``q`` and
  ``dk``/``dv`` shaped like ``k``/``v`` (``h_kv`` heads), in the input dtypes.
* ``causal=True`` means a square diagonal block (``sq == sk``) with the top-left aligned causal mask.

Backends register themselves with :func:`register_kernel`; selection lives in ``megatron_tasp.kernels``.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "KERNEL_REGISTRY",
    "BlockAttention",
    "check_backward_inputs",
    "check_qkv",
    "expand_kv",
    "last_dim_contiguous",
    "lse_dtype_for",
    "register_kernel",
    "sum_kv_groups",
]

#: name -> backend class, filled by :func:`register_kernel` (registration order = listing order). Process-wide
#: by design (like the compiled Triton merge kernel): the engine's other state lives in its plan cache.
KERNEL_REGISTRY: dict[str, type[BlockAttention]] = {}


class BlockAttention(abc.ABC):
    """One attention block: softmax(q k^T * scale) v with its log-sum-exp, and the matching backward.

    Subclasses implement :meth:`unavailable_reason`, :meth:`_forward` and :meth:`_backward`; the public
    :meth:`forward` / :meth:`backward` validate the inputs first (so no backend ever launches a kernel on an
    empty block) and run without autograd recording.
    """

    name: ClassVar[str] = ""

    # -- availability -------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        """None when this backend can run (device, dtype, head_dim); otherwise a short human-readable reason."""

    @classmethod
    def is_available(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
        """True when this backend can run blocks of this device, dtype and head dim."""
        return cls.unavailable_reason(device, dtype, head_dim) is None

    # -- public entry points ------------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        """out ``[b,h,sq,d]`` in q.dtype, lse ``[b,h,sq]`` float32 (natural log), ctx for :meth:`backward`."""
        check_qkv(q, k, v, causal=causal)
        scale = _check_scale(scale)
        with torch.no_grad():
            return self._forward(q, k, v, causal=bool(causal), scale=scale)

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: Any,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """dq, dk, dv of this block. ``out``/``lse`` are the MERGED global output and lse of these queries."""
        check_qkv(q, k, v, causal=causal)
        check_backward_inputs(dout, q, out, lse)
        scale = _check_scale(scale)
        with torch.no_grad():
            return self._backward(dout, q, k, v, out, lse, ctx, causal=bool(causal), scale=scale)

    def forward_unchecked(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                          scale: float) -> tuple[Tensor, Tensor, Any]:
        """:meth:`forward` without input validation or a grad-mode switch, for callers that validated the
        shapes once and run with grad disabled (the TASP engine: its blocks are never empty). Short blocks
        are bound by host time, and the checks cost as much as the launch."""
        return self._forward(q, k, v, causal=causal, scale=scale)

    def backward_unchecked(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           ctx: Any, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`backward` without validation (see :meth:`forward_unchecked`)."""
        return self._backward(dout, q, k, v, out, lse, ctx, causal=causal, scale=scale)

    # -- backend hooks ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        """Backend forward on validated inputs."""

    @abc.abstractmethod
    def _backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: Any,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Backend backward on validated inputs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def register_kernel(cls: type[BlockAttention]) -> type[BlockAttention]:
    """Class decorator: add a backend to :data:`KERNEL_REGISTRY` under ``cls.name``."""
    name = cls.name
    if not name or name != name.lower() or name == "auto":
        raise ValueError(f"kernel class {cls.__name__} needs a lower-case name other than 'auto', got {name!r}")
    if name in KERNEL_REGISTRY and KERNEL_REGISTRY[name] is not cls:
        raise ValueError(f"attention kernel {name!r} is already registered by {KERNEL_REGISTRY[name].__name__}")
    KERNEL_REGISTRY[name] = cls
    return cls


# ---------------------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------------------
def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> None:
    """Validate q/k/v of one block; raises ValueError with a clear message."""
    for nm, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{nm} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{nm} must be 4-D [b, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, h, sq, d = q.shape
    bk, h_kv, sk, dk = k.shape
    if bk != b:
        raise ValueError(f"batch size of q ({b}) and k/v ({bk}) differ")
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and k/v ({dk}) differ")
    if 0 in (b, h, sq, d, h_kv, sk):
        raise ValueError(
            f"empty attention block: q {tuple(q.shape)}, k/v {tuple(k.shape)}. Zero-length q or kv blocks must be "
            "skipped by the caller (the CPU kernel dies with SIGFPE on them)"
        )
    if h % h_kv != 0:
        raise ValueError(f"number of query heads ({h}) must be a multiple of the number of KV heads ({h_kv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if causal and sq != sk:
        raise ValueError(
            f"causal=True is only defined for square diagonal blocks (sq == sk), got sq={sq}, sk={sk}; "
            "split the block or use causal=False for fully visible blocks"
        )


def check_backward_inputs(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor) -> None:
    """Validate the extra tensors of a backward call."""
    for nm, t in (("dout", dout), ("out", out), ("lse", lse)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{nm} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{nm} is on {t.device} but q is on {q.device}")
        if not t.is_floating_point():
            raise ValueError(f"{nm} must be floating point, got {t.dtype}")
    if dout.shape != q.shape:
        raise ValueError(f"dout must be shaped like q {tuple(q.shape)}, got {tuple(dout.shape)}")
    if out.shape != q.shape:
        raise ValueError(f"out must be shaped like q {tuple(q.shape)}, got {tuple(out.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be [b, h, sq] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")


def _check_scale(scale: float) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scale must be a real number, got {scale!r}") from exc
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return s


# ---------------------------------------------------------------------------------------------------------
# small helpers shared by backends
# ---------------------------------------------------------------------------------------------------------
def lse_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """dtype of the lse this layer returns: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def last_dim_contiguous(x: Tensor) -> Tensor:
    """``x`` with unit stride in the last dim (copied only when needed).

    Fused kernels index the head dim as contiguous; the CPU flash op silently returns WRONG results for a
    last-dim stride != 1 (measured, torch 2.13), so every fused backend passes its inputs through this.
    """
    return x if x.stride(-1) == 1 else x.contiguous()


def expand_kv(x: Tensor, groups: int) -> Tensor:
    """[b, h_kv, s, d] -> [b, h_kv * groups, s, d] (query head i reads KV head i // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sum_kv_groups(dx: Tensor, h_kv: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`expand_kv` for gradients: [b, h, s, d] -> [b, h_kv, s, d], summed in float32."""
    if dx.shape[1] == h_kv:
        return dx if dx.dtype == dtype else dx.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dx.unflatten(1, (h_kv, dx.shape[1] // h_kv)).sum(2, dtype=acc).to(dtype)
