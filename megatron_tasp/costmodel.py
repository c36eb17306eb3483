"""Alpha-beta cost model of TASP attention: per-step and total time for any topology, ring count and shape.

Pure Python (no torch, no numpy). The model mirrors what :mod:`megatron_tasp.attention` does, step by step,
on every rank, and is calibrated from one benchmark file (``megatron-tasp bench``) of the machine at hand.
See docs/COSTMODEL.md for the derivation, the fitted numbers, the error table and the assumptions.

Pieces of the model (all times in ms unless named otherwise):

* **Kernels.** One block kernel of F FLOPs (true mask area, bench's formula) takes ``(F + F_half) / R``:
  the rate ``R * F / (F + F_half)`` saturates with the block size, so small blocks run slower. Forward and
  backward kernels have their own (R, F_half), fitted to the single-GPU records (forward: ``fwd`` times,
  backward: ``fwd_bwd - fwd`` with 2.5x the forward FLOPs).
* **Memory-bound work** (packing KV into pieces, concatenating a group's pieces, fp32 merges, dQ/dKV
  accumulation, staging copies): bytes counted from the code, divided by one fitted bandwidth.
* **Host overhead** (Python + launches): ``H = H_pass(n=2, k=1) * ((1-f_s) + f_s*(n-1) + f_p*(n-1)*(k-1))
  + exchanges * H_x``. H_pass, H_x are fitted; the per-step and per-piece shares f_s, f_p are measured
  from host times on CPU (see docs). The GPU overlaps the host except for a fitted prefix:
  ``total = max(H, H_prefix + GPU)``.
* **Communication.** Each step every rank sends k pieces (one per ring) to k distinct peers. A message of m
  bytes on a resource of nominal bandwidth C takes ``latency + t_msg + m / (eta * C)``, i.e. the
  message-size curve ``bw(m) = eta*C * m / (m + s_half)`` with ``s_half = eta*C*t_msg``. Resources: the
  per-peer link (``peer_GBps``), the GPU's intra-node egress (``gpu_egress_GBps``, shared by all of a
  rank's intra-node pieces), the GPU's NIC (``nic_GBps``) and the node's NICs together for inter-node
  pieces (counted from the actual rings; host of a rank = rank // gpus_per_node). A step's exchange
  takes ``alpha_transport + max over ranks and resources``. eta and t_msg come from the transport
  records (one peer on the calibration machine); NICs use an assumed efficiency.
* **Overlap.** A step lasts ``max(compute, comm) + gamma * min(compute, comm)`` (gamma: fitted slow-down
  of kernels that share the GPU with NCCL). Backward moves KV and dK/dV in the same steps (serialised on
  the communicator's stream); the last dK/dV hop home is exposed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from megatron_tasp.options import keep_kv_auto
from megatron_tasp.schedule import Schedule, split_sizes
from megatron_tasp.topology import Topology, generic_topology, load_topology

__all__ = [
    "Calibration", "ErrorReport", "KernelRate", "Prediction", "Shape", "calibrate", "default_calibration",
    "error_report", "load_calibration", "load_records", "predict", "ring_counts",
]

PASSES = ("fwd", "fwd_bwd")
TRANSPORTS = ("a2a", "p2p", "none")
#: Backward schemes of megatron_tasp.attention: ``current`` (own dK/dV stays home, remote accumulators start
#: at step 1 and hop home in the input dtype, since commit e04c614) and ``legacy`` (every dK/dV accumulator,
#: the own one included, travels n hops in the dKV dtype; the code the 2026-11-25 benchmarks ran).
SCHEMES = ("current", "legacy")
#: Upper bound for the fitted bandwidth of memory-bound work: 90 % of an H100's 3.35 TB/s HBM. The memory
#: terms are small next to the kernels, so an unbounded fit can drift past what the hardware can do.
MEM_CAP_GBPS = 3000.0
LEGACY_UNTIL = "2026-11-25"  # records dated up to this day were measured with the legacy backward


class CostModelError(ValueError):
    """A shape, ring count or record set the model cannot handle; the message names the fix."""


# ---------------------------------------------------------------------------------------------------------
# Inputs


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
    dkv_bytes: int = 4  # bytes per element of the travelling dK/dV accumulator (MEGATRON_TASP_DKV_DTYPE)

    def __post_init__(self) -> None:
        for name in ("tokens_per_gpu", "batch", "heads_q", "heads_kv", "head_dim", "dtype_bytes", "dkv_bytes"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise CostModelError(f"shape field '{name}' must be a positive integer, got {val!r}")
        if self.passes not in PASSES:
            raise CostModelError(f"shape field 'passes' must be one of {', '.join(PASSES)}, got {self.passes!r}")
        if self.heads_q % self.heads_kv:
            raise CostModelError(f"heads_q ({self.heads_q}) must be a multiple of heads_kv ({self.heads_kv})")

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Shape:
        """The shape of a benchmark record (``megatron-tasp bench`` format)."""
        dtype = str(rec.get("dtype", "bfloat16"))
        es = 4 if dtype in ("float32", "fp32") else 2
        return cls(tokens_per_gpu=int(rec["tokens_per_gpu"]), batch=int(rec.get("batch", 1)),
                   heads_q=int(rec["heads_q"]), heads_kv=int(rec["heads_kv"]), head_dim=int(rec["head_dim"]),
                   causal=bool(rec["causal"]), passes=str(rec.get("pass", "fwd")), dtype_bytes=es,
                   dkv_bytes=int(rec.get("dkv_bytes", 4)))

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
        seq = self.tokens_per_gpu * n
        f = self.block_flops(seq, seq) * (0.5 if self.causal else 1.0)
        return f * (3.5 if self.passes == "fwd_bwd" else 1.0)


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


# Fitted on docs/benchmarks/2026-11-25-h100x2-cp2-v4.json (2x H100 SXM NV18, torch 2.11, NCCL 2.28.9, cuDNN
# 9.19, bf16) by ``calibrate``; regenerate with ``megatron-tasp simulate --save-calibration``. A test checks
# that these constants still match a fresh calibration on that file.
DEFAULT_CALIBRATION_DICT: dict[str, Any] = {
    "fwd": {"peak_tflops": 608.1, "half_gflop": 33.04},
    "bwd": {"peak_tflops": 540.5, "half_gflop": 100.9},
    "mem_GBps": 3000.0,
    "host_fwd_ms": 0.8835,
    "host_bwd_ms": 1.223,
    "host_prefix_ms": 1.373e-09,
    "host_exchange_a2a_ms": 0.04501,
    "host_exchange_p2p_ms": 0.3349,
    "alpha_a2a_us": 32.97,
    "alpha_p2p_us": 100.1,
    "link_efficiency": 0.7727,
    "msg_overhead_us": 42.99,
    "interference": 0.2489,
    "nic_efficiency": 0.9,
    "host_step_frac_fwd": 0.48,
    "host_step_frac_bwd": 0.53,
    "host_piece_frac_fwd": 0.067,
    "host_piece_frac_bwd": 0.114,
    "calibration_topology": "h100-nv18-2",
    "machine": "NVIDIA H100 80GB HBM3",
    "source": "2026-11-25-h100x2-cp2-v4.json",
}


def default_calibration() -> Calibration:
    """The calibration shipped in code (fitted on the committed 2x H100 CP=2 benchmark)."""
    return Calibration.from_dict(dict(DEFAULT_CALIBRATION_DICT))


# ---------------------------------------------------------------------------------------------------------
# Structure of one call: what each rank computes and sends per step (independent of the calibration)


@dataclass(frozen=True)
class _Group:
    """One block kernel of a step: query rows x key rows, over ``pieces`` concatenated pieces."""

    q_rows: int
    kv_rows: int
    pieces: int
    causal: bool = False


@dataclass(frozen=True)
class _Structure:
    n: int
    k: int
    transport: str
    # per step: the distinct per-rank kernel groups (step 0 has the one own-shard kernel)
    steps: tuple[frozenset[tuple[_Group, ...]], ...]
    # communication terms of one KV exchange, one per (rank, resource): (latency_us, ms at nominal bandwidth, is_nic)
    comm_terms: tuple[tuple[float, float, bool], ...]
    kv_bytes: float  # bytes one rank sends per step (K and V, input dtype)
    stage_send: bool
    stage_recv: bool


def ring_counts(topology: Topology) -> list[int]:
    """Ring counts this topology can actually build (1..max; a k whose construction fails is left out)."""
    return list(_ring_counts(topology))


@lru_cache(maxsize=128)
def _ring_counts(topology: Topology) -> tuple[int, ...]:
    out = []
    for k in range(1, topology.max_rings() + 1):
        try:
            topology.rings(k)
        except (NotImplementedError, ValueError):
            continue
        out.append(k)
    return tuple(out)


@lru_cache(maxsize=256)
def _schedule(topology: Topology, k: int) -> Schedule:
    try:
        rings = topology.rings(k)
    except NotImplementedError as exc:
        raise CostModelError(f"topology '{topology.name}' cannot build {k} rings yet ({exc}); "
                             f"available ring counts: {ring_counts(topology)}") from None
    return Schedule(rings)


def _pieces(shape: Shape, k: int) -> tuple[list[int], list[int], int]:
    """(front sizes, back sizes, half) exactly as attention.make_pieces splits the local tokens."""
    t = shape.tokens_per_gpu
    if shape.causal:
        if t % 2:
            raise CostModelError(f"causal TASP needs an even number of tokens per GPU, got {t}")
        half = t // 2
        if half < k:
            raise CostModelError(f"{t} tokens per GPU are too few for {k} rings (each zigzag block needs >= k)")
        return split_sizes(half, k), split_sizes(half, k), half
    if t < k:
        raise CostModelError(f"{t} tokens per GPU are too few for {k} rings")
    return split_sizes(t, k), [0] * k, t


@lru_cache(maxsize=256)
def _early_counts(topology: Topology, k: int, big: int) -> tuple[frozenset[tuple[int, int]], ...]:
    """Per step t >= 1: the distinct (pieces from earlier ranks, of which among the ``big`` first rings) over
    all ranks. With split_sizes the first ``big`` pieces are one token longer, so these two counts fix the
    sizes of a rank's two causal kernel groups."""
    sched = _schedule(topology, k)
    n = sched.world_size
    per_step: list[set[tuple[int, int]]] = [set() for _ in range(n)]
    for r in range(n):
        cnt, cnt_big = [0] * n, [0] * n
        for i, ring in enumerate(sched.rings):
            p = sched.pos[i][r]
            is_big = i < big
            for t in range(1, n):
                if ring[p - t] < r:  # source of ring i's piece at step t (negative indices wrap)
                    cnt[t] += 1
                    if is_big:
                        cnt_big[t] += 1
        for t in range(1, n):
            per_step[t].add((cnt[t], cnt_big[t]))
    return tuple(frozenset(x) for x in per_step)


@lru_cache(maxsize=4096)
def _structure(topology: Topology, k: int, shape: Shape, transport: str) -> _Structure:
    sched = _schedule(topology, k)
    n = sched.world_size
    front, back, half = _pieces(shape, k)
    lengths = [f + b for f, b in zip(front, back)]
    t_local = shape.tokens_per_gpu
    steps: list[frozenset[tuple[_Group, ...]]] = [frozenset({(_Group(t_local, t_local, 1, shape.causal),)})]
    if not shape.causal:
        steps += [frozenset({(_Group(t_local, t_local, k),)})] * (n - 1)
    else:
        q, big = divmod(half, k)  # front_i = back_i = q + (i < big)
        for counts in _early_counts(topology, k, big)[1:]:
            sigs = set()
            for ne, ne_big in counts:
                groups = []
                if ne:  # all queries x the front slices of pieces from earlier ranks
                    groups.append(_Group(t_local, q * ne + ne_big, ne))
                nl, nl_big = k - ne, big - ne_big
                if nl:  # back queries x whole pieces from later ranks
                    groups.append(_Group(t_local - half, 2 * (q * nl + nl_big), nl))
                sigs.add(tuple(groups))
            steps.append(frozenset(sigs))
    # communication of one KV exchange (every step moves the same pieces along the same arcs)
    row = 2 * shape.kv_row_bytes  # K and V
    gpn = topology.gpus_per_node
    intra, inter = topology.intra_node, topology.inter_node
    terms: set[tuple[float, float, bool]] = set()
    node_nic_bytes = [0.0] * topology.nodes
    stage_send = stage_recv = False
    for r in range(n):
        send = [(sched.succ(i, r), lengths[i] * row) for i in range(k)]
        recv_peers = [sched.pred(i, r) for i in range(k)]
        stage_send |= [p for p, _ in send] != sorted(p for p, _ in send)
        stage_recv |= recv_peers != sorted(recv_peers)
        intra_b = [b for p, b in send if p // gpn == r // gpn]
        inter_b = [b for p, b in send if p // gpn != r // gpn]
        for b in intra_b:  # each piece on its own peer link
            terms.add((intra.latency_us, b / 1e9 / intra.peer_GBps * 1e3, False))
        if intra_b:  # all intra-node pieces share the GPU's egress
            terms.add((intra.latency_us, sum(intra_b) / 1e9 / intra.gpu_egress_GBps * 1e3, False))
        if inter_b:
            if inter is None:
                raise CostModelError(f"topology '{topology.name}' has inter-node arcs but no inter_node section")
            terms.add((inter.latency_us, sum(inter_b) / 1e9 / inter.nic_GBps * 1e3, True))
            node_nic_bytes[r // gpn] += sum(inter_b)
    if inter is not None and any(node_nic_bytes):
        node_cap = inter.nic_GBps * inter.nics_per_node
        terms.add((inter.latency_us, max(node_nic_bytes) / 1e9 / node_cap * 1e3, True))
    if transport != "a2a":
        stage_send = stage_recv = False
    return _Structure(n=n, k=k, transport=transport, steps=tuple(steps), comm_terms=tuple(sorted(terms)),
                      kv_bytes=float(sum(lengths) * row), stage_send=stage_send, stage_recv=stage_recv)


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class StepTime:
    """One step of one pass (max over ranks)."""

    passes: str  # "fwd" or "bwd"
    step: int
    compute_ms: float  # kernels + memory-bound work
    comm_ms: float  # exchanges in flight during the step
    time_ms: float  # the step's duration with overlap

    @property
    def exposed_ms(self) -> float:
        """Communication not hidden behind the step's compute."""
        return self.time_ms - self.compute_ms


@dataclass(frozen=True)
class Prediction:
    """Predicted time of one TASP attention call (per rank; all ranks take the same time)."""

    topology: str
    world_size: int
    num_rings: int
    transport: str
    shape: Shape
    steps: tuple[StepTime, ...]
    kernel_ms: float
    memory_ms: float
    comm_ms: float  # sum of all exchange times (hidden or not)
    exposed_comm_ms: float  # communication not hidden by compute (incl. the final dK/dV hop)
    gpu_ms: float  # GPU timeline: prefix-free sum of steps and non-overlapped parts
    host_ms: float  # host (Python + launch) time of the call
    total_ms: float
    tflops_per_gpu: float
    bound: str  # "gpu" or "host"

    @property
    def compute_ms(self) -> float:
        """Kernels plus memory-bound work."""
        return self.kernel_ms + self.memory_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (per-step rows included)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("steps", "shape")}
        d["shape"] = asdict(self.shape)
        d["steps"] = [dict(asdict(s), exposed_ms=s.exposed_ms) for s in self.steps]
        return d


def _comm_ms(struct: _Structure, calib: Calibration, scale: float) -> float:
    """One exchange moving ``scale`` x the KV bytes along every ring."""
    if struct.transport == "none" or struct.n < 2:
        return 0.0
    worst = 0.0
    tmsg = calib.msg_overhead_us * 1e-3
    for lat_us, nominal_ms, nic in struct.comm_terms:
        eff = calib.nic_efficiency if nic else calib.link_efficiency
        worst = max(worst, lat_us * 1e-3 + tmsg + scale * nominal_ms / eff)
    return calib.alpha_us(struct.transport) * 1e-3 + worst


def _group_ms(g: _Group, shape: Shape, calib: Calibration, bwd: bool, acc_bytes: int, single: bool = False,
              first: bool = False) -> tuple[float, float]:
    """(kernel ms, memory ms) of one block kernel and its merge / accumulation.

    ``single``: CP=2 with one chunk, where every row is merged once straight into the output and dQ is
    accumulated in the input dtype; ``first``: the first dK/dV contribution of a piece (a copy, not an add).
    """
    f = shape.block_flops(g.q_rows, g.kv_rows) * (0.5 if g.causal else 1.0)
    qb, kb = g.q_rows * shape.q_row_bytes, g.kv_rows * shape.kv_row_bytes
    cat = 4 * kb if g.pieces > 1 else 0.0  # torch.cat of the group's K/V pieces: read + write
    if not bwd:  # one fused merge kernel: read both partial outputs, write the result
        return calib.fwd.time_ms(f), (cat + (3 if single else 5) * qb) / calib.mem_GBps * 1e-6
    a = acc_bytes / shape.dtype_bytes
    dq = (3 if single else 5) * qb  # dQ += block dQ (input dtype at CP=2, else fp32)
    dkv = 2 * ((1 + a) if first else (2 * a + 1)) * kb  # dK/dV into the travelling accumulator
    return calib.bwd.time_ms(2.5 * f), (cat + dq + dkv) / calib.mem_GBps * 1e-6


def _step_compute(sigs: frozenset, shape: Shape, calib: Calibration, bwd: bool, acc_bytes: int,
                  own: bool, single: bool = False, first: bool = False) -> tuple[float, float]:
    best = (0.0, 0.0)
    for groups in sigs:
        kern = mem = 0.0
        for g in groups:
            km, mm = _group_ms(g, shape, calib, bwd, acc_bytes, single, first)
            kern += km
            mem += 0.0 if own else mm
        if kern + mem > sum(best):
            best = (kern, mem)
    return best


def _combine(compute: float, comm: float, gamma: float) -> float:
    return max(compute, comm) + gamma * min(compute, comm)


def keeps_kv(n: int, shape: Shape, transport: str) -> bool:
    """What ``keep_kv='auto'`` decides in ``tasp_attention`` for this shape (``options.keep_kv_auto``)."""
    return keep_kv_auto(n, 2 * shape.tokens_per_gpu * shape.kv_row_bytes, transport)


def predict(topology: Topology, shape: Shape, k: int, calib: Calibration | None = None, *,
            transport: str | None = None, scheme: str = "current", keep_kv: bool | None = None) -> Prediction:
    """Predict one TASP attention call with ``k`` rings on ``topology`` (all of its GPUs are the CP group).

    ``transport`` defaults to what ``tasp_attention`` uses (a2a on one node, p2p across nodes); ``none``
    models the compute-only benchmark (local copy instead of an exchange). ``scheme`` selects the backward
    variant (see ``SCHEMES``). ``keep_kv`` (default: the engine's 'auto' rule, :func:`keeps_kv`): the
    backward runs on the forward's KV (no KV exchange or packing, remote steps first, the local block last
    with the hop home hidden behind it).
    """
    calib = calib or default_calibration()
    if transport is None:
        transport = "p2p" if topology.multinode else "a2a"
    if transport not in TRANSPORTS:
        raise CostModelError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if scheme not in SCHEMES:
        raise CostModelError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if topology.world_size < 2:
        raise CostModelError("the cost model needs a CP group of at least 2 GPUs")
    if not isinstance(k, int) or not 1 <= k <= topology.max_rings():
        raise CostModelError(f"topology '{topology.name}' offers 1..{topology.max_rings()} rings, got {k!r}")
    st = _structure(topology, k, replace(shape, passes="fwd"), transport)
    n, es = st.n, shape.dtype_bytes
    keep = (keeps_kv(n, shape, transport) if keep_kv is None else bool(keep_kv)) and scheme == "current"
    T, qrow, kvrow = shape.tokens_per_gpu, shape.q_row_bytes, shape.kv_row_bytes
    gb = calib.mem_GBps * 1e6  # bytes per ms
    gamma = calib.interference
    steps: list[StepTime] = []
    kern_total = mem_total = comm_total = exposed = 0.0

    # per-exchange memory traffic of the transport (a2a staging copies or the compute-only local copy)
    def xfer_mem(scale: float) -> float:
        if transport == "none":
            return 4 * T * kvrow * scale / gb
        return (4 * T * kvrow * scale * (int(st.stage_send) + int(st.stage_recv))) / gb

    def account(phase: str, t: int, kern: float, mem: float, comm: float) -> float:
        """One step: compute and transfer overlap (``_combine``); record it, add to the totals; its time."""
        nonlocal kern_total, mem_total, comm_total, exposed
        comp = kern + mem
        dur = _combine(comp, comm, gamma)
        steps.append(StepTime(phase, t, comp, comm, dur))
        kern_total, mem_total, comm_total = kern_total + kern, mem_total + mem, comm_total + comm
        exposed += dur - comp
        return dur

    # ---- forward
    x_kv = _comm_ms(st, calib, 1.0)
    single = n == 2 and scheme == "current"  # one merge per row: no fp32 accumulators (attention.py)
    pack = (4 if k == 1 else 8) * T * kvrow  # K/V into the flat piece buffer (a plain copy for one ring)
    acc_init = (T * qrow if single else 3 * T * qrow)  # unmerged rows copied / fp32 accumulator from step 0
    gpu = (pack + acc_init) / gb
    mem_total += (pack + acc_init) / gb
    for t in range(n):
        kern, mem = _step_compute(st.steps[t], shape, calib, False, es, own=(t == 0), single=single)
        comm = x_kv if t < n - 1 else 0.0
        mem += xfer_mem(1.0) if t < n - 1 else 0.0
        gpu += account("fwd", t, kern, mem, comm)
    if not single:
        gpu += 3 * T * qrow / gb  # fp32 -> input dtype output
        mem_total += 3 * T * qrow / gb
    n_x = n - 1
    host = _host_ms(calib, "fwd", n, k) + n_x * calib.host_exchange_ms(transport)

    # ---- backward
    if shape.passes == "fwd_bwd":
        mid = shape.dkv_bytes / es  # travelling accumulator, relative to the input dtype
        home = 1.0 if scheme == "current" else mid  # the last hop
        x_mid, x_home = _comm_ms(st, calib, mid), _comm_ms(st, calib, home)
        if scheme == "current":
            if keep:  # no packing; dq starts as fp32 zeros unless CP=2 (added into the local block's dq)
                pre = 0 if single else 2 * T * qrow
            else:
                pre = pack + (0 if single else 3 * T * qrow)  # pack; dq = dq0.float() unless CP=2
            # unpack (not needed for one ring); dk0 + remote home in one rounding; dq -> input dtype
            post = (0 if k == 1 else 4 * T * kvrow) + 6 * T * kvrow + (0 if single else 3 * T * qrow)
        else:
            pre = 2 * T * qrow + 8 * T * kvrow  # dq zeros; pack
            post = 4 * mid * T * kvrow + 2 * (mid + 1) * T * kvrow + 3 * T * qrow
        bgpu = pre / gb
        mem_total += pre / gb
        order = [*range(1, n), 0] if keep else list(range(n))
        for t in order:
            last = t == n - 1
            acc = es if (last and scheme == "current") else shape.dkv_bytes
            kern, mem = _step_compute(st.steps[t], shape, calib, True, acc, own=(t == 0), single=single,
                                      first=(t == 1 and scheme == "current"))
            if t == 0 and scheme != "current":
                mem += (5 * T * qrow + 2 * (1 + mid) * T * kvrow + 8 * mid * T * kvrow) / gb
            if scheme == "current" and last and n > 2:
                mem += 2 * T * kvrow * (mid + 1) / gb  # fp32 accumulator -> input-dtype hop home
            comm = 0.0
            if t < n - 1 and not keep:
                comm += x_kv
                mem += xfer_mem(1.0)
            if scheme == "current" and t >= 2:
                comm += x_mid
                mem += xfer_mem(mid)
            if scheme == "legacy" and t >= 1:
                comm += x_mid
                mem += xfer_mem(mid)
            if keep and t == 0:  # the local block runs last: the hop home overlaps it
                comm += x_home
                mem += xfer_mem(home)
            bgpu += account("bwd", t, kern, mem, comm)
        if not keep:  # the last dK/dV hop home: nothing left to overlap with
            bgpu += x_home + xfer_mem(home)
            comm_total += x_home
            exposed += x_home
            mem_total += xfer_mem(home)
        bgpu += post / gb
        mem_total += post / gb
        gpu += bgpu
        n_bx = (0 if keep else n - 1) + (n - 1 if scheme == "current" else n)
        host += _host_ms(calib, "bwd", n, k) + n_bx * calib.host_exchange_ms(transport)
    total = max(host, calib.host_prefix_ms + gpu)
    return Prediction(topology=topology.name, world_size=n, num_rings=k, transport=transport, shape=shape,
                      steps=tuple(steps), kernel_ms=kern_total, memory_ms=mem_total, comm_ms=comm_total,
                      exposed_comm_ms=exposed, gpu_ms=gpu, host_ms=host, total_ms=total,
                      tflops_per_gpu=shape.total_flops(n) / n / total / 1e9,
                      bound="host" if host > calib.host_prefix_ms + gpu else "gpu")


def _host_ms(calib: Calibration, part: str, n: int, k: int) -> float:
    if part == "fwd":
        base, fs, fp = calib.host_fwd_ms, calib.host_step_frac_fwd, calib.host_piece_frac_fwd
    else:
        base, fs, fp = calib.host_bwd_ms, calib.host_step_frac_bwd, calib.host_piece_frac_bwd
    return base * ((1.0 - fs) + fs * (n - 1) + fp * (n - 1) * (k - 1))


# ---------------------------------------------------------------------------------------------------------
# Calibration from benchmark records


def load_records(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """All records of the given benchmark JSON files (each a JSON list)."""
    out: list[dict[str, Any]] = []
    for p in paths:
        data = json.loads(Path(p).read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise CostModelError(f"{p}: expected a JSON list of benchmark records")
        for r in data:
            if isinstance(r, dict):
                out.append({**r, "source": r.get("source", Path(p).name)})
    return out


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """A calibration JSON (``Calibration.save``) or a benchmark file to calibrate on."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return Calibration.from_dict(data)
    if isinstance(data, list):
        return calibrate(load_records([path]))
    raise CostModelError(f"{path}: neither a calibration object nor a list of benchmark records")


def record_scheme(rec: dict[str, Any]) -> str:
    """Backward scheme a record was measured with (``dkv_scheme`` field, else by date, see LEGACY_UNTIL)."""
    if rec.get("dkv_scheme") in SCHEMES:
        return str(rec["dkv_scheme"])
    date = str(rec.get("date", ""))
    return "legacy" if date and date <= LEGACY_UNTIL else "current"


def _ok(rec: dict[str, Any]) -> bool:
    """A usable timing the model describes (the copy-engine ``symm`` transport and multi-chunk runs are not
    modelled and are left out of calibration and error reports)."""
    return ("error" not in rec and isinstance(rec.get("time_ms"), (int, float)) and rec["time_ms"] > 0
            and rec.get("transport", "a2a") in (*TRANSPORTS, None) and int(rec.get("chunks") or 1) == 1)


def _attention(records: Sequence[dict[str, Any]], impl: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") != "transport" and r.get("impl") == impl and _ok(r)]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a small dense linear system (Gaussian elimination with partial pivoting)."""
    m = len(b)
    aug = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(m):
        p = max(range(c, m), key=lambda r: abs(aug[r][c]))
        if abs(aug[p][c]) < 1e-300:
            raise CostModelError("degenerate fit: the records do not determine the parameters")
        aug[c], aug[p] = aug[p], aug[c]
        for r in range(m):
            if r != c:
                f = aug[r][c] / aug[c][c]
                aug[r] = [x - f * y for x, y in zip(aug[r], aug[c])]
    return [aug[i][m] / aug[i][i] for i in range(m)]


def _weighted_lsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares in relative error: minimise sum ((x.row - y) / y)^2."""
    m = len(rows[0])
    ata = [[0.0] * m for _ in range(m)]
    aty = [0.0] * m
    for row, yi in zip(rows, y):
        w = 1.0 / (yi * yi)
        for i in range(m):
            aty[i] += w * row[i] * yi
            for j in range(m):
                ata[i][j] += w * row[i] * row[j]
    return _solve(ata, aty)


def nelder_mead(f: Callable[[list[float]], float], x0: Sequence[float], step: float = 0.5,
                iters: int = 400, tol: float = 1e-9) -> list[float]:
    """Minimise ``f`` from ``x0`` with the Nelder-Mead simplex (small, dependency-free)."""
    dim = len(x0)
    pts = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(dim)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(dim + 1), key=lambda i: vals[i])
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (abs(vals[0]) + tol):
            break
        cen = [sum(p[j] for p in pts[:-1]) / dim for j in range(dim)]
        refl = [c + (c - w) for c, w in zip(cen, pts[-1])]
        fr = f(refl)
        if fr < vals[0]:
            exp_ = [c + 2 * (c - w) for c, w in zip(cen, pts[-1])]
            fe = f(exp_)
            pts[-1], vals[-1] = (exp_, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(cen, pts[-1])]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                best = pts[0]
                pts = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, p)] for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[min(range(dim + 1), key=lambda i: vals[i])]


def _fit_transport(records: Sequence[dict[str, Any]], peer_GBps: float) -> dict[str, float] | None:
    """alpha (per transport), bw_max and t_msg from the transport sweep.

    Model: ``t = alpha_transport + (bytes + j * s_half) / bw_max`` for j messages to ONE peer (p2p_one_peer:
    j = 1, a2a_single: j = 1, p2p_same_peer_split: j = messages <= 4; the 7-way split is left out: NCCL
    runs it out of its fast path at >= 32 MiB and TASP never sends two pieces to one peer).
    """
    rows, y = [], []
    for r in records:
        if r.get("kind") != "transport" or not _ok(r):
            continue
        impl, j = r.get("impl"), int(r.get("messages", 1))
        if impl not in ("p2p_one_peer", "a2a_single", "p2p_same_peer_split") or j > 4:
            continue
        rows.append([1.0 if impl == "a2a_single" else 0.0, 0.0 if impl == "a2a_single" else 1.0,
                     float(r["bytes"]) / 1e9, float(j)])
        y.append(float(r["time_ms"]))
    if len(rows) < 6:
        return None
    a2a, p2p, ms_per_gb, tmsg = _weighted_lsq(rows, y)
    bw = 1e3 / ms_per_gb  # GB/s
    err = [(sum(c * x for c, x in zip(row, (a2a, p2p, ms_per_gb, tmsg))) / yi - 1) for row, yi in zip(rows, y)]
    return {"alpha_a2a_us": max(a2a, 0.0) * 1e3, "alpha_p2p_us": max(p2p, 0.0) * 1e3, "bw_max_GBps": bw,
            "link_efficiency": min(bw / peer_GBps, 1.0), "msg_overhead_us": max(tmsg, 0.0) * 1e3,
            "s_half_MB": max(tmsg, 0.0) * bw / 1e3 * 1e3, "records": len(rows),
            "rms_rel_err": math.sqrt(sum(e * e for e in err) / len(err)), "max_rel_err": max(abs(e) for e in err)}


def _fit_rates(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Kernel rate curves from single-GPU records: fwd from ``fwd``, bwd from ``fwd_bwd - fwd``."""
    single = _attention(records, "single_gpu")
    by = {(r["tokens_per_gpu"], r["batch"], r["heads_q"], r["heads_kv"], r["head_dim"], r["causal"], r["pass"]): r
          for r in single}
    fr, fy, br, by_ = [], [], [], []
    for key, r in by.items():
        if key[-1] != "fwd":
            continue
        shape = Shape.from_record(r)
        f = shape.block_flops(shape.tokens_per_gpu, shape.tokens_per_gpu) * (0.5 if shape.causal else 1.0)
        fr.append([f / 1e9, 1.0])
        fy.append(float(r["time_ms"]))
        fb = by.get(key[:-1] + ("fwd_bwd",))
        if fb is not None and fb["time_ms"] > r["time_ms"]:
            br.append([2.5 * f / 1e9, 1.0])
            by_.append(float(fb["time_ms"]) - float(r["time_ms"]))
    if len(fr) < 2 or len(br) < 2:
        return None
    out: dict[str, Any] = {}
    for name, rows, y in (("fwd", fr, fy), ("bwd", br, by_)):
        ms_per_gf, c = _weighted_lsq(rows, y)
        peak = 1.0 / ms_per_gf  # TFLOP/s (GFLOP per ms)
        rate = KernelRate(peak_tflops=peak, half_gflop=max(c, 0.0) * peak)
        err = [rate.time_ms(row[0] * 1e9) / yi - 1 for row, yi in zip(rows, y)]
        out[name] = rate
        out[f"{name}_rms_rel_err"] = math.sqrt(sum(e * e for e in err) / len(err))
        out[f"{name}_max_rel_err"] = max(abs(e) for e in err)
        out[f"{name}_records"] = len(rows)
    return out


@lru_cache(maxsize=64)
def _calib_topology(name: str, cp: int) -> Topology:
    try:
        topo = load_topology(name)
    except (OSError, ValueError):
        topo = generic_topology(cp)
    if topo.world_size != cp:
        topo = replace(generic_topology(cp), intra_node=topo.intra_node)
    return topo


def _log_err(pred: float, meas: float) -> float:
    return math.log(pred / meas)


def _pred_record(rec: dict[str, Any], calib: Calibration, topo_name: str) -> Prediction:
    topo = _calib_topology(topo_name, int(rec["cp"]))
    k = int(rec.get("num_rings") or 1)
    transport = "none" if rec["impl"] == "compute_only" else str(rec.get("transport") or "a2a")
    return predict(topo, Shape.from_record(rec), k, calib, transport=transport, scheme=record_scheme(rec),
                   keep_kv=bool(rec.get("keep_kv", False)))


def calibrate(records: Sequence[dict[str, Any]], topology: Topology | str | None = None) -> Calibration:
    """Fit a Calibration to benchmark records of one machine (``megatron-tasp bench`` JSON).

    ``topology`` is the machine the records were taken on (default: the shipped ``h100-nv18-2`` preset for
    CP=2 records, a generic NVSwitch node otherwise); its ``peer_GBps`` turns the measured bandwidth into
    the link efficiency. Steps: transport sweep -> alpha, bw_max, t_msg; single-GPU -> kernel rates;
    compute_only -> memory bandwidth and host times; tasp -> per-exchange host time and interference.
    Missing record kinds keep the shipped defaults (reported in ``fit``).
    """
    base = default_calibration()
    attn = [r for r in records if r.get("kind") != "transport" and _ok(r)]
    cps = sorted({int(r["cp"]) for r in attn if r.get("impl") in ("tasp", "compute_only")})
    cp = cps[0] if cps else 2
    if topology is None:
        topo_name = "h100-nv18-2" if cp == 2 else f"generic-{cp}"
    elif isinstance(topology, Topology):
        topo_name = topology.source or topology.name
    else:
        topo_name = str(topology)
    topo = _calib_topology(topo_name, cp)
    fit: dict[str, Any] = {"calibration_topology": topo_name}
    calib = replace(base, calibration_topology=topo_name, fit=fit,
                    machine=str(next((r.get("device") for r in records if r.get("device")), "")),
                    source=",".join(sorted({str(r.get("source", "")) for r in records if r.get("source")})))

    tr = _fit_transport(records, topo.intra_node.peer_GBps)
    if tr is not None:
        fit["transport"] = tr
        calib = replace(calib, alpha_a2a_us=tr["alpha_a2a_us"], alpha_p2p_us=tr["alpha_p2p_us"],
                        link_efficiency=tr["link_efficiency"], msg_overhead_us=tr["msg_overhead_us"])
    rates = _fit_rates(records)
    if rates is not None:
        fit["kernels"] = {k: (asdict(v) if isinstance(v, KernelRate) else v) for k, v in rates.items()}
        calib = replace(calib, fwd=rates["fwd"], bwd=rates["bwd"])

    co = _attention(records, "compute_only")
    if len(co) >= 4:
        def obj_co(u: list[float]) -> float:
            c = replace(calib, mem_GBps=min(math.exp(u[0]), MEM_CAP_GBPS), host_fwd_ms=math.exp(u[1]),
                        host_bwd_ms=math.exp(u[2]), host_prefix_ms=math.exp(u[3]))
            return sum(_log_err(_pred_record(r, c, topo_name).total_ms, r["time_ms"]) ** 2 for r in co)
        u0 = [math.log(calib.mem_GBps), math.log(calib.host_fwd_ms), math.log(calib.host_bwd_ms),
              math.log(calib.host_prefix_ms)]
        u = nelder_mead(obj_co, u0, step=0.3, iters=600)
        calib = replace(calib, mem_GBps=min(math.exp(u[0]), MEM_CAP_GBPS), host_fwd_ms=math.exp(u[1]),
                        host_bwd_ms=math.exp(u[2]), host_prefix_ms=math.exp(u[3]))
        fit["compute_only"] = _summary([_pred_record(r, calib, topo_name).total_ms / r["time_ms"] - 1 for r in co])

    tasp = _attention(records, "tasp")
    if len(tasp) >= 3:
        seen = {r.get("transport") for r in tasp}
        base = calib

        def mk(u: list[float]) -> Calibration:  # a transport with no records keeps its prior host cost
            return replace(base,
                           host_exchange_a2a_ms=math.exp(u[0]) if "a2a" in seen else base.host_exchange_a2a_ms,
                           host_exchange_p2p_ms=math.exp(u[1]) if "p2p" in seen else base.host_exchange_p2p_ms,
                           interference=1.0 / (1.0 + math.exp(-u[2])))

        def obj_t(u: list[float]) -> float:
            c = mk(u)
            return sum(_log_err(_pred_record(r, c, topo_name).total_ms, r["time_ms"]) ** 2 for r in tasp)
        g0 = min(max(calib.interference, 1e-3), 0.999)
        u0 = [math.log(max(calib.host_exchange_a2a_ms, 1e-4)), math.log(max(calib.host_exchange_p2p_ms, 1e-4)),
              math.log(g0 / (1 - g0))]
        calib = mk(nelder_mead(obj_t, u0, step=0.5, iters=600))
        fit["tasp"] = _summary([_pred_record(r, calib, topo_name).total_ms / r["time_ms"] - 1 for r in tasp])
    return calib


def _summary(errs: Sequence[float]) -> dict[str, float]:
    if not errs:
        return {"records": 0}
    a = [abs(e) for e in errs]
    return {"records": len(errs), "mean_abs_rel_err": sum(a) / len(a), "median_abs_rel_err": statistics.median(a),
            "rms_rel_err": math.sqrt(sum(e * e for e in errs) / len(errs)), "max_abs_rel_err": max(a),
            "mean_signed_rel_err": sum(errs) / len(errs)}


@dataclass
class ErrorReport:
    """Predicted vs measured for every TASP (and compute-only) record of the calibration machine."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    def table(self, impl: str = "tasp") -> str:
        """A plain-text table of one impl's rows."""
        lines = [f"{'impl':<12} {'tr':<4} k {'tok/GPU':>7} {'heads':>5} {'mask':<6} {'pass':<7} "
                 f"{'measured':>9} {'predicted':>9} {'rel.err':>8}"]
        for r in self.rows:
            if r["impl"] != impl:
                continue
            lines.append(f"{r['impl']:<12} {r['transport']:<4} {r['num_rings']} {r['tokens_per_gpu']:>7} "
                         f"{r['heads_q']:>2}/{r['heads_kv']:<2} {'causal' if r['causal'] else 'full':<6} "
                         f"{r['pass']:<7} {r['measured_ms']:>9.3f} {r['predicted_ms']:>9.3f} {r['rel_err']:>+8.1%}")
        return "\n".join(lines)


def error_report(records: Sequence[dict[str, Any]], calib: Calibration,
                 topology: Topology | str | None = None) -> ErrorReport:
    """Predicted vs measured time of every TASP and compute-only record (relative error = pred/meas - 1)."""
    topo_name = calib.calibration_topology if topology is None else (
        topology.source or topology.name if isinstance(topology, Topology) else str(topology))
    rows = []
    for r in records:
        if r.get("kind") == "transport" or r.get("impl") not in ("tasp", "compute_only") or not _ok(r):
            continue
        p = _pred_record(r, calib, topo_name)
        rows.append({"impl": r["impl"], "transport": p.transport, "num_rings": p.num_rings, "cp": int(r["cp"]),
                     "tokens_per_gpu": int(r["tokens_per_gpu"]), "heads_q": int(r["heads_q"]),
                     "heads_kv": int(r["heads_kv"]), "causal": bool(r["causal"]), "pass": r["pass"],
                     "measured_ms": float(r["time_ms"]), "predicted_ms": p.total_ms,
                     "rel_err": p.total_ms / float(r["time_ms"]) - 1, "bound": p.bound,
                     "exposed_comm_ms": p.exposed_comm_ms})
    summary: dict[str, Any] = {}
    for impl in ("tasp", "compute_only"):
        sel = [r for r in rows if r["impl"] == impl]
        summary[impl] = _summary([r["rel_err"] for r in sel])
        for key, vals in (("pass", PASSES), ("transport", ("a2a", "p2p"))):
            for v in vals:
                errs = [r["rel_err"] for r in sel if r[key] == v]
                if errs and impl == "tasp":
                    summary[f"{impl}/{v}"] = _summary(errs)
        big = [r["rel_err"] for r in sel if r["tokens_per_gpu"] >= 8192]
        if big:
            summary[f"{impl}/tokens>=8K"] = _summary(big)
    return ErrorReport(rows=rows, summary=summary)
