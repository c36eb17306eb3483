"""Inputs of the cost model: the shape of one call (:class:`Shape`), the block-kernel rate curve
(:class:`KernelRate`) and the fitted constants (:class:`Calibration`, shipped as
:data:`DEFAULT_CALIBRATION_DICT`). Pure Python, no torch, no numpy."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from megatron_tasp.costmodel.records import attention_flops

__all__ = ["DEFAULT_CALIBRATION_DICT", "PASSES", "Calibration", "CostModelError", "KernelRate", "Shape",
           "default_calibration"]

PASSES = ("fwd", "fwd_bwd")


class CostModelError(ValueError):
    """A shape, ring count or record set the model cannot handle; the message names the fix."""


@dataclass(frozen=True)
class Shape:
    """One attention call as seen by one CP rank."""

    tokens_per_gpu: int
    batch: int = 1
    heads_q: int = 32
    heads_kv: int = 32
    head_dim: int = 128
    causal: bool = True
    passes: str = "fwd"  # "fwd" or "fwd_bwd"
    dtype_bytes: int = 2
    dkv_bytes: int = 4  # bytes per element of the travelling dK/dV accumulator (TaspOptions.dkv_dtype)

    def __post_init__(self) -> None:
        for name in ("tokens_per_gpu", "batch", "heads_q", "heads_kv", "head_dim", "dtype_bytes", "dkv_bytes"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise CostModelError(f"shape field '{name}' must be a positive integer, got {val!r}")
        if self.passes not in PASSES:
            raise CostModelError(f"shape field 'passes' must be one of {', '.join(PASSES)}, got {self.passes!r}")
        if self.heads_q % self.heads_kv:
            raise CostModelError(f"heads_q ({self.heads_q}) must be a multiple of heads_kv ({self.heads_kv})")

    @property
    def kv_row_bytes(self) -> int:
        """Bytes of one token of K (or V) in the input dtype."""
        return self.batch * self.heads_kv * self.head_dim * self.dtype_bytes

    @property
    def q_row_bytes(self) -> int:
        """Bytes of one token of Q (or of the output) in the input dtype."""
        return self.batch * self.heads_q * self.head_dim * self.dtype_bytes

    def block_flops(self, q_rows: float, kv_rows: float) -> float:
        """Forward FLOPs of a dense (unmasked) block of q_rows x kv_rows."""
        return 4.0 * self.batch * self.heads_q * self.head_dim * q_rows * kv_rows

    def total_flops(self, n: int) -> float:
        """FLOPs of the whole sequence (n ranks), as ``megatron-tasp bench`` counts them (true mask area)."""
        return attention_flops(self.tokens_per_gpu * n, self.batch, self.heads_q, self.head_dim, self.causal,
                               self.passes)


@dataclass(frozen=True)
class KernelRate:
    """Saturating block-kernel rate: ``rate(F) = peak * F / (F + half)``, so ``time = (F + half) / peak``."""

    peak_tflops: float
    half_gflop: float

    def time_ms(self, flops: float) -> float:
        """Milliseconds of one kernel of ``flops`` FLOPs."""
        return (flops + self.half_gflop * 1e9) / (self.peak_tflops * 1e12) * 1e3

    def tflops(self, flops: float) -> float:
        """Achieved TFLOP/s of one kernel of ``flops`` FLOPs."""
        return self.peak_tflops * flops / (flops + self.half_gflop * 1e9)


@dataclass(frozen=True)
class Calibration:
    """Fitted (and a few assumed) parameters of the model; see docs/COSTMODEL.md for each one."""

    fwd: KernelRate
    bwd: KernelRate
    mem_GBps: float  # effective HBM bandwidth of the memory-bound ops (fitted, compute_only records)
    host_fwd_ms: float  # host time of one forward call at n=2, k=1 (fitted)
    host_bwd_ms: float  # host time of one backward call at n=2, k=1 (fitted)
    host_prefix_ms: float  # host time the GPU cannot hide (before the first kernel) (fitted)
    host_exchange_a2a_ms: float  # host time per all_to_all_single exchange (fitted, tasp records)
    host_exchange_p2p_ms: float  # host time per batch_isend_irecv exchange (fitted, tasp records)
    alpha_a2a_us: float  # per-call latency of all_to_all_single (fitted, transport records)
    alpha_p2p_us: float  # per-call latency of batch_isend_irecv (fitted, transport records)
    link_efficiency: float  # achieved / nominal peer bandwidth (fitted: bw_max / peer_GBps of the calib. machine)
    msg_overhead_us: float  # per-message time t_msg (s_half = eta * C * t_msg) (fitted, transport records)
    interference: float  # gamma: kernels slow down by gamma * overlapped comm time (fitted, tasp records)
    nic_efficiency: float = 0.9  # achieved / nominal NIC bandwidth (ASSUMED: no inter-node data)
    host_step_frac_fwd: float = 0.48  # per-step share of the n=2 forward host time (measured on CPU)
    host_step_frac_bwd: float = 0.53  # per-step share of the n=2 backward host time (measured on CPU)
    host_piece_frac_fwd: float = 0.067  # per extra ring, per step, share of the n=2 forward host time (CPU)
    host_piece_frac_bwd: float = 0.114  # per extra ring, per step, share of the n=2 backward host time (CPU)
    calibration_topology: str = "h100-nv18-2"
    machine: str = ""
    source: str = ""
    fit: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def alpha_us(self, transport: str) -> float:
        """Per-call latency of a transport."""
        return {"a2a": self.alpha_a2a_us, "p2p": self.alpha_p2p_us}.get(transport, 0.0)

    def host_exchange_ms(self, transport: str) -> float:
        """Host time of one exchange call of a transport."""
        return {"a2a": self.host_exchange_a2a_ms, "p2p": self.host_exchange_p2p_ms}.get(transport, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``Calibration.from_dict`` reads it back)."""
        d = asdict(self)
        d["kind"] = "megatron-tasp-calibration"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`."""
        d = {k: v for k, v in d.items() if k != "kind"}
        d["fwd"] = KernelRate(**d["fwd"])
        d["bwd"] = KernelRate(**d["bwd"])
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise CostModelError(f"unknown calibration field(s) {', '.join(extra)}")
        return cls(**d)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the calibration as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")


# Fitted on docs/benchmarks/2026-11-30-h200x2-cp2.json (2x H200 SXM NV18, torch 2.11, NCCL 2.28.9, cuDNN 9.19,
# CUDA 13.0, bf16) by ``calibrate``; regenerate with ``megatron-tasp simulate --bench
# docs/benchmarks/2026-11-30-h200x2-cp2.json --save-calibration FILE`` (4 significant digits kept). The record
# holds no TASP run with the p2p transport, so host_exchange_p2p_ms is the prior (the 2x H100 v4 value); the
# nic_efficiency and host_*_frac_* are assumed / measured on CPU (see Calibration). A test checks that these
# constants still match a fresh calibration on that file. The earlier 2x H100 default came from
# docs/benchmarks/2026-11-25-h100x2-cp2-v4.json; ``calibrate`` on that file still gives it.
DEFAULT_CALIBRATION_DICT: dict[str, Any] = {
    "fwd": {"peak_tflops": 596.7, "half_gflop": 46.13},
    "bwd": {"peak_tflops": 531.9, "half_gflop": 119.2},
    "mem_GBps": 1895.0,
    "host_fwd_ms": 1.091,
    "host_bwd_ms": 1.583,
    "host_prefix_ms": 2.815e-09,
    "host_exchange_a2a_ms": 0.1214,
    "host_exchange_p2p_ms": 0.3349,
    "alpha_a2a_us": 11.71,
    "alpha_p2p_us": 85.05,
    "link_efficiency": 0.5856,
    "msg_overhead_us": 60.06,
    "interference": 0.9109,
    "nic_efficiency": 0.9,
    "host_step_frac_fwd": 0.48,
    "host_step_frac_bwd": 0.53,
    "host_piece_frac_fwd": 0.067,
    "host_piece_frac_bwd": 0.114,
    "calibration_topology": "h200-nv18-2",
    "machine": "NVIDIA H200",
    "source": "2026-11-30-h200x2-cp2.json",
}


def default_calibration() -> Calibration:
    """The calibration shipped in code (fitted on the committed 2x H200 CP=2 benchmark)."""
    return _default_calibration()


@lru_cache(maxsize=1)
def _default_calibration() -> Calibration:
    return Calibration.from_dict(dict(DEFAULT_CALIBRATION_DICT))
