"""Alpha-beta cost model of TASP attention: per-step and total time for any topology, ring count and shape.

Pure Python (no torch, no numpy). The model mirrors what the engine does, step by step, on every rank; it is
calibrated from one benchmark file of the machine at hand (:mod:`megatron_tasp.costmodel.fitting`). See
docs/COSTMODEL.md for the derivation, the fitted numbers, the error table and the assumptions.

Pieces of the model (all times in ms unless named otherwise):

* **Kernels.** One block kernel of F FLOPs (true mask area) takes ``(F + F_half) / R`` (:class:`KernelRate`);
  forward and backward have their own (R, F_half).
* **Memory-bound work** (packing KV into pieces, concatenating a group's pieces, merges, dQ/dKV accumulation,
  staging copies): bytes counted from the code, divided by one fitted bandwidth.
* **Host overhead** (Python + launches): ``H = H_pass(n=2, k=1) * ((1-f_s) + f_s*(n-1) + f_p*(n-1)*(k-1))
  + exchanges * H_x``. The GPU overlaps the host except for a fitted prefix: ``total = max(H, H_prefix + GPU)``.
* **Communication.** A message of m bytes on a resource of nominal bandwidth C takes
  ``latency + t_msg + m / (eta * C)``; a step's exchange takes ``alpha_transport + max over ranks and
  resources`` (per-peer links, the GPU's egress, its NIC, the node's NICs; see ``structure``).
* **Overlap.** A step lasts ``max(compute, comm) + gamma * min(compute, comm)``. The backward moves KV (unless
  kept from the forward) and the remote dK/dV accumulators in the same steps; the last hop home is exposed
  unless the local block, run last with kept KV, hides it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from megatron_tasp.costmodel.params import (
    DEFAULT_CALIBRATION_DICT,
    Calibration,
    CostModelError,
    KernelRate,
    Shape,
    default_calibration,
)
from megatron_tasp.costmodel.structure import Group, Structure, call_structure, ring_counts
from megatron_tasp.options import keep_kv_auto
from megatron_tasp.topology import Topology

__all__ = ["DEFAULT_CALIBRATION_DICT", "TRANSPORTS", "Calibration", "CostModelError", "KernelRate", "Prediction",
           "Shape", "StepTime", "default_calibration", "keeps_kv", "predict", "ring_counts"]

#: Transports the model describes; "none" is the compute-only benchmark (a local copy instead of an exchange).
TRANSPORTS = ("a2a", "p2p", "none")


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
    keep_kv: bool = False  # the backward ran on the forward's KV

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


def keeps_kv(n: int, shape: Shape, transport: str) -> bool:
    """What ``keep_kv='auto'`` decides in ``tasp_attention`` for this shape (``options.keep_kv_auto``)."""
    return keep_kv_auto(n, 2 * shape.tokens_per_gpu * shape.kv_row_bytes, transport)


# ---------------------------------------------------------------------------------------------------------
# One call: its constants, and a timeline that adds up steps


@dataclass(frozen=True)
class _Call:
    """Constants of one predicted call (bytes per token, the structure, the calibration)."""

    st: Structure
    shape: Shape
    calib: Calibration
    transport: str

    @property
    def single(self) -> bool:
        """CP = 2: rows merge once straight into the output, dQ accumulates in the input dtype."""
        return self.st.n == 2

    def kv_bytes(self, factor: float = 1.0) -> float:
        """``factor`` x the local K (or V) in the input dtype, in bytes."""
        return factor * self.shape.tokens_per_gpu * self.shape.kv_row_bytes

    def q_bytes(self, factor: float = 1.0) -> float:
        """``factor`` x the local Q (or output) in the input dtype, in bytes."""
        return factor * self.shape.tokens_per_gpu * self.shape.q_row_bytes

    def mem_ms(self, nbytes: float) -> float:
        """Milliseconds of memory-bound work moving ``nbytes``."""
        return nbytes / (self.calib.mem_GBps * 1e6)

    def exchange_ms(self, scale: float) -> float:
        """One exchange moving ``scale`` x the KV bytes along every ring (alpha + the slowest resource)."""
        if self.transport == "none" or self.st.n < 2:
            return 0.0
        calib, worst = self.calib, 0.0
        tmsg = calib.msg_overhead_us * 1e-3
        for lat_us, nominal_ms, nic in self.st.comm_terms:
            eff = calib.nic_efficiency if nic else calib.link_efficiency
            worst = max(worst, lat_us * 1e-3 + tmsg + scale * nominal_ms / eff)
        return calib.alpha_us(self.transport) * 1e-3 + worst

    def exchange_mem_ms(self, scale: float) -> float:
        """Memory traffic of one exchange: a2a staging copies, or the compute-only benchmark's local copy."""
        if self.transport == "none":
            return self.mem_ms(self.kv_bytes(4 * scale))
        return self.mem_ms(self.kv_bytes(4 * scale) * (int(self.st.stage_send) + int(self.st.stage_recv)))

    def step_compute(self, t: int, bwd: bool, acc_bytes: int, first: bool = False) -> tuple[float, float]:
        """(kernel ms, memory ms) of step ``t`` on its slowest rank (the own block's memory work is free)."""
        best = (0.0, 0.0)
        for groups in self.st.steps[t]:
            kern = mem = 0.0
            for g in groups:
                km, mm = self.group_ms(g, bwd, acc_bytes, first)
                kern += km
                mem += 0.0 if t == 0 else mm
            if kern + mem > sum(best):
                best = (kern, mem)
        return best

    def group_ms(self, g: Group, bwd: bool, acc_bytes: int, first: bool) -> tuple[float, float]:
        """(kernel ms, memory ms) of one block kernel and its merge / accumulation (``first``: the first
        dK/dV contribution of a piece, a copy rather than an add)."""
        shape, calib = self.shape, self.calib
        f = shape.block_flops(g.q_rows, g.kv_rows) * (0.5 if g.causal else 1.0)
        qb, kb = g.q_rows * shape.q_row_bytes, g.kv_rows * shape.kv_row_bytes
        cat = 4 * kb if g.pieces > 1 else 0.0  # torch.cat of the group's K/V pieces: read + write
        merge = (3 if self.single else 5) * qb  # read both partial outputs (fp32 accumulator at CP > 2), write
        if not bwd:
            return calib.fwd.time_ms(f), self.mem_ms(cat + merge)
        a = acc_bytes / shape.dtype_bytes
        dkv = 2 * ((1 + a) if first else (2 * a + 1)) * kb  # dK/dV into the travelling accumulator
        return calib.bwd.time_ms(2.5 * f), self.mem_ms(cat + merge + dkv)


@dataclass
class _Timeline:
    """Steps and totals of one call; a step lasts ``max(compute, comm) + gamma * min(compute, comm)``."""

    gamma: float
    steps: list[StepTime] = field(default_factory=list)
    kernel_ms: float = 0.0
    memory_ms: float = 0.0
    comm_ms: float = 0.0
    exposed_ms: float = 0.0

    def step(self, phase: str, t: int, kern: float, mem: float, comm: float) -> float:
        """Record one step; return its duration."""
        comp = kern + mem
        dur = max(comp, comm) + self.gamma * min(comp, comm)
        self.steps.append(StepTime(phase, t, comp, comm, dur))
        self.kernel_ms += kern
        self.memory_ms += mem
        self.comm_ms += comm
        self.exposed_ms += dur - comp
        return dur

    def memory(self, ms: float) -> float:
        """Memory-bound work outside the steps; return its duration."""
        self.memory_ms += ms
        return ms

    def exposed_transfer(self, comm: float, mem: float) -> float:
        """A transfer nothing overlaps (the last dK/dV hop home); return its duration."""
        self.comm_ms += comm
        self.exposed_ms += comm
        self.memory_ms += mem
        return comm + mem


# ---------------------------------------------------------------------------------------------------------
# The passes


def _forward_gpu(c: _Call, tl: _Timeline) -> float:
    """GPU time of the forward: pack KV, n steps (exchanges in steps 0..n-2), the output cast."""
    n, k = c.st.n, c.st.k
    pack = c.kv_bytes(4 if k == 1 else 8)  # K/V into the flat piece buffer (a plain copy for one ring)
    acc_init = c.q_bytes(1 if c.single else 3)  # unmerged rows copied / fp32 accumulator from step 0
    gpu = tl.memory(c.mem_ms(pack + acc_init))
    x_kv = c.exchange_ms(1.0)
    for t in range(n):
        kern, mem = c.step_compute(t, bwd=False, acc_bytes=c.shape.dtype_bytes)
        sends = t < n - 1
        gpu += tl.step("fwd", t, kern, mem + (c.exchange_mem_ms(1.0) if sends else 0.0), x_kv if sends else 0.0)
    if not c.single:
        gpu += tl.memory(c.mem_ms(c.q_bytes(3)))  # fp32 -> input dtype output
    return gpu


def _backward_gpu(c: _Call, tl: _Timeline, keep: bool) -> float:
    """GPU time of the backward.

    Remote dK/dV accumulators (``dkv_bytes``) start at step 1 and travel from step 2 on; the last hop home is
    in the input dtype. Without kept KV the KV pieces travel again (steps 0..n-2) and the hop home is
    exposed; with kept KV the remote steps run first and the local block last, hiding the hop home.
    """
    shape, n, k = c.shape, c.st.n, c.st.k
    mid = shape.dkv_bytes / shape.dtype_bytes  # travelling accumulator, relative to the input dtype
    x_kv, x_mid, x_home = c.exchange_ms(1.0), c.exchange_ms(mid), c.exchange_ms(1.0)
    if keep:  # no packing; dq starts as fp32 zeros unless CP=2 (added into the local block's dq)
        pre = 0.0 if c.single else c.q_bytes(2)
    else:  # pack; dq = dq0.float() unless CP=2
        pre = c.kv_bytes(4 if k == 1 else 8) + (0.0 if c.single else c.q_bytes(3))
    gpu = tl.memory(c.mem_ms(pre))
    for t in ([*range(1, n), 0] if keep else range(n)):
        last = t == n - 1
        acc = shape.dtype_bytes if last else shape.dkv_bytes
        kern, mem = c.step_compute(t, bwd=True, acc_bytes=acc, first=(t == 1))
        comm = 0.0
        if last and n > 2:
            mem += c.mem_ms(c.kv_bytes(2 * (mid + 1)))  # fp32 accumulator -> input-dtype hop home
        if t < n - 1 and not keep:
            comm += x_kv
            mem += c.exchange_mem_ms(1.0)
        if t >= 2:
            comm += x_mid
            mem += c.exchange_mem_ms(mid)
        if keep and t == 0:  # the local block runs last: the hop home overlaps it
            comm += x_home
            mem += c.exchange_mem_ms(1.0)
        gpu += tl.step("bwd", t, kern, mem, comm)
    if not keep:
        gpu += tl.exposed_transfer(x_home, c.exchange_mem_ms(1.0))
    # unpack (not needed for one ring); dk0 + remote home in one rounding; dq -> input dtype
    post = (0.0 if k == 1 else c.kv_bytes(4)) + c.kv_bytes(6) + (0.0 if c.single else c.q_bytes(3))
    return gpu + tl.memory(c.mem_ms(post))


def _host_ms(calib: Calibration, part: str, n: int, k: int) -> float:
    """Host time of one pass without its exchanges (shares per step and per extra ring, see the module doc)."""
    if part == "fwd":
        base, fs, fp = calib.host_fwd_ms, calib.host_step_frac_fwd, calib.host_piece_frac_fwd
    else:
        base, fs, fp = calib.host_bwd_ms, calib.host_step_frac_bwd, calib.host_piece_frac_bwd
    return base * ((1.0 - fs) + fs * (n - 1) + fp * (n - 1) * (k - 1))


def _host_total(c: _Call, keep: bool) -> float:
    """Host time of the call: per pass, plus one host cost per exchange call."""
    n, k, calib = c.st.n, c.st.k, c.calib
    per_x = calib.host_exchange_ms(c.transport)
    host = _host_ms(calib, "fwd", n, k) + (n - 1) * per_x
    if c.shape.passes == "fwd_bwd":
        exchanges = (0 if keep else n - 1) + (n - 1)  # KV again unless kept; dK/dV hops
        host += _host_ms(calib, "bwd", n, k) + exchanges * per_x
    return host


def _check(topology: Topology, k: int, transport: str | None) -> str:
    """The transport to model (default: a2a on one node, p2p across nodes), after checking the arguments."""
    if transport is None:
        transport = "p2p" if topology.multinode else "a2a"
    if transport not in TRANSPORTS:
        raise CostModelError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if topology.world_size < 2:
        raise CostModelError("the cost model needs a CP group of at least 2 GPUs")
    if not isinstance(k, int) or not 1 <= k <= topology.max_rings():
        raise CostModelError(f"topology '{topology.name}' offers 1..{topology.max_rings()} rings, got {k!r}")
    return transport


def predict(topology: Topology, shape: Shape, k: int, calib: Calibration | None = None, *,
            transport: str | None = None, keep_kv: bool | None = None) -> Prediction:
    """Predict one TASP attention call with ``k`` rings on ``topology`` (all of its GPUs are the CP group).

    ``transport`` defaults to what ``tasp_attention`` uses (a2a on one node, p2p across nodes); ``none``
    models the compute-only benchmark. ``keep_kv`` (default: the engine's 'auto' rule, :func:`keeps_kv`):
    the backward runs on the forward's KV (no KV exchange or packing, the local block last).
    """
    calib = calib or default_calibration()
    transport = _check(topology, k, transport)
    c = _Call(call_structure(topology, k, replace(shape, passes="fwd"), transport), shape, calib, transport)
    keep = keeps_kv(c.st.n, shape, transport) if keep_kv is None else bool(keep_kv)
    tl = _Timeline(gamma=calib.interference)
    gpu = _forward_gpu(c, tl)
    if shape.passes == "fwd_bwd":
        gpu += _backward_gpu(c, tl, keep)
    host = _host_total(c, keep)
    total = max(host, calib.host_prefix_ms + gpu)
    return Prediction(topology=topology.name, world_size=c.st.n, num_rings=k, transport=transport, shape=shape,
                      steps=tuple(tl.steps), kernel_ms=tl.kernel_ms, memory_ms=tl.memory_ms, comm_ms=tl.comm_ms,
                      exposed_comm_ms=tl.exposed_ms, gpu_ms=gpu, host_ms=host, total_ms=total,
                      tflops_per_gpu=shape.total_flops(c.st.n) / c.st.n / total / 1e9,
                      bound="host" if host > calib.host_prefix_ms + gpu else "gpu", keep_kv=keep)
