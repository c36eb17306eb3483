"""A TASP call compiled for its shapes and options: plan, pieces, kernel and transports, built once.

:func:`compile_call` runs on the first call of a signature (the plan cache keeps the result):

1. effective options: ``options`` (or ``default_options()``) with the explicit keywords applied;
2. local validation, the same at every CP size: topology (preset or path exists; size matches the group
   when CP > 1), ``num_rings`` against it, transport, kernel name and availability;
3. CP > 1: the cross-rank agreement (:mod:`megatron_tasp.engine.agree`, one all-reduce; a rank whose
   step 2 failed still joins it, so every rank raises);
4. CP > 1: the rank plan ('auto' ring count, host placement), chunks, kept KV, pieces and one transport
   per lane; :class:`CompiledCall` holds them with the per-call helpers the forward and backward share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.engine.agree import agree, options_digest, signature
from megatron_tasp.engine.cache import PLAN_CACHE, Scope
from megatron_tasp.engine.channel import Channel
from megatron_tasp.engine.errors import TaspConfigError
from megatron_tasp.engine.exchange import ExchangeSettings, PieceLayout, make_transport
from megatron_tasp.engine.plan import (
    LOCAL_PLAN,
    Pieces,
    RankPlan,
    build_rank_plan,
    check_rings,
    check_transport,
    make_pieces,
    resolve_num_rings,
    resolve_topology,
    transport_name,
)
from megatron_tasp.kernels import BlockAttention, get_kernel
from megatron_tasp.options import TaspOptionError, TaspOptions, default_options, keep_kv_auto
from megatron_tasp.schedule import EARLIER, LATER, RankStep
from megatron_tasp.tuning import calibration, choose_chunks

logger = logging.getLogger(__name__)

FULL = "full"
COMPUTE_ONLY = "none"  # benchmark-only transport keyword: no communication (the compute-only bound)
_KEYWORDS = ("num_rings", "topology", "kernel", "transport", "chunks", "keep_kv")


def bhsd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] view -> [b, h, s, d] view."""
    return x.permute(1, 2, 0, 3)


def sbhd(x: torch.Tensor) -> torch.Tensor:
    """[b, h, s, d] view -> [s, b, h, d] view."""
    return x.permute(2, 0, 1, 3)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators (merged output and lse, dQ, travelling dK/dV): fp32, or the input's when wider (fp64)."""
    return torch.promote_types(dtype, torch.float32)


def resolve_options(options: TaspOptions | None, explicit: tuple) -> tuple[TaspOptions, bool]:
    """(effective options, compute_only): ``explicit`` (the keywords in :data:`_KEYWORDS` order) win over
    ``options``, which defaults to ``default_options()`` (defaults < environment)."""
    try:
        base = default_options() if options is None else options
    except TaspOptionError as exc:
        raise TaspConfigError(str(exc)) from None
    if not isinstance(base, TaspOptions):
        raise TaspConfigError(f"options must be a TaspOptions (megatron_tasp.options.parse_options builds one "
                              f"from a mapping), got {type(base).__name__}")
    changes = {name: value for name, value in zip(_KEYWORDS, explicit) if value is not None}
    compute_only = changes.get("transport") == COMPUTE_ONLY
    if compute_only:
        del changes["transport"]
    try:
        return (base.replace(**changes) if changes else base), compute_only
    except TaspOptionError as exc:
        raise TaspConfigError(str(exc)) from None


class LocalCall:
    """CP size 1: one kernel, no exchange."""

    def __init__(self, kernel: BlockAttention, causal: bool, scale: float, packed_dense_rows: int | None = None,
                 packed_kernel: str = "auto"):
        self.plan = LOCAL_PLAN
        self.kernel, self.causal, self.scale = kernel, causal, scale
        self.packed_dense_rows = packed_dense_rows  # packed documents: segments this large on the dense kernel
        self.packed_kernel = packed_kernel  # packed documents: the varlen kernel on CUDA (options.packed_kernel)
        self.local_kernel: Any = kernel  # the step-0 block's kernel (a segmented one for packed documents)
        self.keep_kv = False
        self.chunks = 1


class CompiledCall:
    """Per-signature state shared by forward and backward: plan, pieces, kernel, one transport per lane."""

    def __init__(self, plan: RankPlan, group, kernel: BlockAttention, causal: bool, scale: float, pieces: Pieces,
                 kv_shape: tuple[int, int, int], keep_kv: bool, options: TaspOptions, settings: ExchangeSettings,
                 side: torch.cuda.Stream | None):
        self.plan, self.group, self.kernel = plan, group, kernel
        self.causal, self.scale, self.pieces = causal, scale, pieces
        self.chunks = pieces.chunks
        self.keep_kv = keep_kv and plan.world_size > 1
        self.fused_merge = options.fused_merge
        self.packed_dense_rows = options.packed_dense_rows  # packed documents: segments this large on the kernel
        self.packed_kernel = options.packed_kernel  # packed documents: the varlen kernel on CUDA
        self.cuda_graphs = options.cuda_graphs  # replay forward and backward from CUDA graphs (engine.graphed)
        self.graphed: Any = None  # its GraphedCall, made on the first call
        self.dkv_input_dtype = options.dkv_dtype == "input"  # the travelling dK/dV in the input dtype
        self.side = side  # the stream the first exchange of a call is posted on (CUDA)
        # the stream the own block runs on beside the remote blocks (CP=2, one chunk; None: in line), set where
        # measured: packed documents in their THD order (megatron_tasp.engine.thd)
        self.local_stream: torch.cuda.Stream | None = None
        b, hkv, d = kv_shape
        self.transports = []
        for j in range(self.chunks):
            layout = PieceLayout(tuple((n_, 2, b, hkv, d) for n_ in pieces.lengths(j)))
            self.transports.append(make_transport(plan.transport, group, plan.send_peers, plan.recv_peers, layout,
                                                  settings))
        # the first exchange may go on a side stream (see channel.detached) only if posting it allocates
        # nothing that another stream could reuse while the transfer still reads it
        self.detach_first = not any(t.allocates_on_start for t in self.transports)
        # one merge per row (CP=2, one chunk): the fp32 accumulators can be skipped exactly (one rounding)
        self.single_contribution = plan.world_size == 2 and self.chunks == 1
        self.unmerged_rows: slice | None = None  # rows of the output no remote block touches (CP=2)
        # every block over all query rows and all rows of its pieces, the case's rows picked by the blocks'
        # document masks instead (packed documents at CP=2 in their own THD order, megatron_tasp.engine.thd)
        self.full_rows = False
        if self.single_contribution and causal:
            if not any(c in (EARLIER, FULL) for st in plan.steps[1:] for c, _ in self.groups(st)):
                self.unmerged_rows = slice(None, pieces.half)
        # the kernel of every block: the local one (step 0), and blocks[t][lane] = [(case, rings, kernel)] for
        # the groups of step t >= 1; packed documents swap in segmented kernels (megatron_tasp.thd)
        self.local_kernel: Any = kernel
        self.blocks: list[list[list[tuple[str, list[int], Any]]]] = [[]]
        for t, st in enumerate(plan.steps[1:], start=1):
            if st.step != t:
                raise AssertionError(f"schedule steps out of order: step {st.step} at position {t}")
            self.blocks.append([[(c, r, kernel) for c, r in self.groups(st)] for _ in range(self.chunks)])

    @property
    def own_stream(self) -> torch.cuda.Stream | None:
        """The own block's stream (``local_stream``) where every row gets one remote contribution, which the
        forward's merge and the backward's sums read only after joining it; else None (in line)."""
        return self.local_stream if self.single_contribution else None

    def dkv_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """dtype of the travelling dK/dV accumulator for inputs of ``dtype``."""
        return dtype if self.dkv_input_dtype else acc_dtype(dtype)

    def channel(self, dtype: torch.dtype, device: torch.device, what: str, buffers=None, role: str = "kv",
                depth: int = 2) -> Channel:
        """A channel over this call's lanes cycling through ``depth`` buffers (double-buffered by default)."""
        return Channel(self.transports, dtype, device, what, buffers, role, depth)

    def groups(self, st: RankStep) -> list[tuple[str, list[int]]]:
        """(case, rings) groups to compute at a step t >= 1."""
        if not self.causal:
            return [(FULL, list(range(self.plan.num_rings)))]
        return [(c, st.rings_with(c)) for c in (EARLIER, LATER) if st.rings_with(c)]

    def rows_of(self, lane: int, case: str, ring: int) -> int:
        """Rows of ring's sub-piece in ``lane`` that a group of ``case`` attends to."""
        return self.pieces.front[lane][ring] if case == EARLIER and not self.full_rows else \
            self.pieces.front[lane][ring] + self.pieces.back[lane][ring]

    def group_kv(self, views: list[torch.Tensor], lane: int, case: str,
                 rings: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ([b, h_kv, s, d] views or copies) of a group of held sub-pieces of one lane."""
        parts = [views[i][: self.rows_of(lane, case, i)] for i in rings]
        kv = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return bhsd(kv[:, 0]), bhsd(kv[:, 1])

    def q_rows(self, case: str) -> slice:
        """Query rows (local positions) a group attends from."""
        return slice(self.pieces.half, None) if case == LATER and not self.full_rows else slice(None)

    def pack(self, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Write local K/V ([s, b, h_kv, d]) into a flat buffer in piece order."""
        shaped = out.view(-1, 2, *k.shape[1:])
        if self.pieces.identity:
            torch.stack((k, v), dim=1, out=shaped)  # one kernel for both
        else:
            torch.index_select(torch.stack((k, v), dim=1), 0, self.pieces.perm, out=shaped)

    def unpack(self, flat: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`pack`: flat piece buffer -> (K, V) views in local order."""
        shaped = flat.view(-1, 2, *like.shape[1:])
        if not self.pieces.identity:
            res = torch.empty_like(shaped)
            res.index_copy_(0, self.pieces.perm, shaped)
            shaped = res
        return shaped[:, 0], shaped[:, 1]


def _kernel(name: str | None, q: torch.Tensor, source: str) -> BlockAttention:
    try:
        return PLAN_CACHE.local.get_or_build(("kernel", name, q.device, q.dtype, q.shape[-1]),
                                             lambda: get_kernel(name, q.device, q.dtype, q.shape[-1]))
    except ValueError as exc:
        raise TaspConfigError(f"{exc} (kernel from {source})") from None


def _kernel_source(options: TaspOptions | None, kernel: str | None) -> str:
    if kernel is not None:
        return "kernel="
    return "options.kernel" if options is not None else "the default options (MEGATRON_TASP_KERNEL)"


def collective_device(group) -> torch.device:
    """Where a collective's tensor must live when the inputs cannot tell (they are not tensors)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compile_call(scope: Scope, key: Hashable | None, q, k, v, causal: bool, softmax_scale: float | None,
                 options: TaspOptions | None, explicit: tuple,
                 problem: BaseException | None, attention: Any = None) -> LocalCall | CompiledCall:
    """Compile (and cache under ``key`` in ``scope``) the call; ``problem`` is what the input checks found;
    ``attention`` is the public entry, timed by the ring-count probe (``auto_probe``)."""
    n = len(scope.ranks) if scope.group is not None else 1
    eff = topo = kernel = tname = None
    compute_only = False
    scale = 1.0
    if problem is None:
        try:
            eff, compute_only = resolve_options(options, explicit)
            scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
            topo = resolve_topology(eff.topology, n, eff.hosts)
            check_rings(eff.num_rings, topo)
            tname = COMPUTE_ONLY if compute_only else transport_name(eff.transport, topo)
            check_transport(tname, topo, q.device)
            kernel = _kernel(eff.kernel, q, _kernel_source(options, explicit[2]))
            if n > 1 and eff.calibration and "auto" in (eff.num_rings, eff.chunks):
                calibration(eff)  # a file missing on some nodes fails here, so the agreement below reports it
        except (TaspConfigError, ValueError, RuntimeError) as exc:
            problem = exc
    if n == 1:
        if problem is not None:
            raise problem
        call: LocalCall | CompiledCall = LocalCall(kernel, causal, scale, eff.packed_dense_rows,
                                                     eff.packed_kernel)
    else:
        sig = signature(q, k, causal, options_digest(eff, scale, compute_only)) if problem is None else None
        if sig is None or scope.get(("agreed", sig)) is None:
            device = q.device if isinstance(q, torch.Tensor) else collective_device(scope.group)
            agree(scope.group, n, scope.group.rank(), sig, device, problem,
                  describe=str(eff.to_dict()) if eff is not None else "")
            scope.put(("agreed", sig), True)
        call = _compile_group_call(scope, q, k, causal, scale, eff, topo, tname, kernel, attention)
    if key is not None:
        scope.put(key, call)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("TASP call compiled for CP group %s, q %s: %s", scope.ranks or "(none)", tuple(q.shape),
                     run_summary(call))
    return call


def _compile_group_call(scope: Scope, q, k, causal: bool, scale: float, eff: TaspOptions, topo, tname: str,
                        kernel: BlockAttention, attention: Any = None) -> CompiledCall:
    group, n = scope.group, len(scope.ranks)
    hint = {"tokens_per_gpu": q.shape[0], "batch": q.shape[1], "heads_q": q.shape[2],
            "heads_kv": k.shape[2], "head_dim": q.shape[3], "causal": causal, "dtype_bytes": q.element_size()}
    k_rings = resolve_num_rings(eff.num_rings, topo, hint, group, eff, tname, attention)
    plan = scope.get_or_build(("plan", topo, k_rings, tname, eff.hosts),
                              lambda: build_rank_plan(group, topo, k_rings, tname, eff.hosts))
    chunks = eff.chunks if eff.chunks != "auto" else choose_chunks(topo, hint, plan.num_rings, plan.transport,
                                                                   options=eff)
    keep = eff.keep_kv
    if keep == "auto":
        keep = keep_kv_auto(n, 2 * k.numel() * k.element_size(), plan.transport, cap_bytes=eff.keep_kv_cap_bytes)
    pieces = PLAN_CACHE.local.get_or_build(("pieces", q.shape[0], plan.num_rings, causal, q.device, chunks),
                                           lambda: make_pieces(q.shape[0], plan.num_rings, causal, q.device, chunks))
    on_cuda = q.device.type == "cuda"
    settings = ExchangeSettings(timeout_s=eff.timeout_s, direct_collectives=eff.direct_collectives,
                                streams=PLAN_CACHE.streams, symm_pool=scope.symm() if tname == "symm" else None)
    side = PLAN_CACHE.streams.get(q.device, "side") if on_cuda else None
    return CompiledCall(plan, group, kernel, causal, scale, pieces, (k.shape[1], k.shape[2], k.shape[3]), bool(keep),
                        eff, settings, side)


def run_summary(call: LocalCall | CompiledCall) -> dict[str, Any]:
    """What a compiled call runs: CP size, rings, transport, chunks, kept KV, kernel."""
    return {"cp": call.plan.world_size, "num_rings": call.plan.num_rings, "transport": call.plan.transport,
            "chunks": call.chunks, "keep_kv": call.keep_kv, "kernel": call.kernel.name}
