"""Automatic ring count, chunk count and transport from the cost model, plus an optional probe.

``choose_num_rings(topology, shape_hint)`` predicts the time of every ring count the topology can build with
:func:`megatron_tasp.costmodel.predict` and returns the fastest, but only leaves the 1-ring schedule (zigzag
ring attention) when the predicted gain exceeds a margin (3 %): the model's error on the calibration machine
is a few percent, so smaller predicted gains are noise. The gain must hold both with the fitted
compute/communication interference and with ideal overlap (interference 0), the parameter whose transfer to
other machines is least certain (docs/COSTMODEL.md).

* Everything configurable comes from a :class:`~megatron_tasp.options.TaspOptions` (``options=``;
  ``default_options()`` when None): ``calibration`` (a calibration JSON written by ``megatron-tasp simulate
  --save-calibration`` or a benchmark records file; None: the shipped constants), ``auto_probe``,
  ``dkv_dtype`` and ``transport``. This module reads no environment variable.
* The pass is assumed to be forward + backward (training) unless the hint says ``passes: "fwd"``.
* Pure Python on the choice path (no torch, no numpy); choices are cached by value in bounded LRU caches.
* ``probe_num_rings(group, candidates, shape_hint)`` times candidates once on the real CP group (torch,
  imported on call) and remembers the winner; ``choose_num_rings`` returns a remembered probe result before
  consulting the model. With ``options.auto_probe`` and a ``group``, the probe runs the first time a shape
  is seen.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import lru_cache
from typing import Any

from megatron_tasp.costmodel.model import predict
from megatron_tasp.costmodel.params import Calibration, CostModelError, Shape, default_calibration
from megatron_tasp.costmodel.structure import ring_counts
from megatron_tasp.options import TaspOptions, default_options
from megatron_tasp.topology import Topology

__all__ = ["CHUNK_GPU_COST", "DEFAULT_MARGIN", "calibration", "choose_chunks", "choose_num_rings",
           "choose_transport", "clear_caches", "probe_num_rings", "shape_from_hint"]

DEFAULT_MARGIN = 0.03  # leave the 1-ring schedule only for a predicted gain above 3 %
#: Measured on 2x H100 (compute-only runs with 2 and 4 chunks): each extra lane costs about 4 % more GPU time
#: (smaller kernels, one more merge per step), on top of its host launch cost.
CHUNK_GPU_COST = 0.04
_PROBED_MAX = 256
_PROBED: dict[tuple, int] = {}  # (topology, hint key) -> probed ring count, oldest first
_MODEL_ERRORS = (CostModelError, ValueError, KeyError, TypeError)


def clear_caches() -> None:
    """Forget remembered probe results, loaded calibrations and cached choices."""
    _PROBED.clear()
    for fn in (_load_calibration, _model_choice, _transport_choice, _chunks_choice):
        fn.cache_clear()


def calibration(options: TaspOptions | None = None) -> Calibration:
    """The calibration in use: ``options.calibration`` (cached per path and modification time), else the
    shipped default."""
    path = (options or default_options()).calibration
    if not path:
        return default_calibration()
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        raise CostModelError(f"calibration file {path} not found (TaspOptions.calibration / "
                             "MEGATRON_TASP_CALIBRATION); write one with `megatron-tasp simulate "
                             "--save-calibration FILE`") from None
    return _load_calibration(os.path.abspath(path), mtime)


@lru_cache(maxsize=4)
def _load_calibration(path: str, mtime_ns: int) -> Calibration:
    from megatron_tasp.costmodel.fitting import load_calibration  # a records file is fitted (offline work)

    return load_calibration(path)


def shape_from_hint(shape_hint: Mapping[str, Any], *, dkv_dtype: str = "fp32") -> Shape:
    """A cost-model Shape from ``tasp_attention``'s hint (tokens_per_gpu, batch, heads_q, heads_kv, head_dim,
    causal, dtype_bytes; optional passes, default fwd_bwd); ``dkv_dtype`` is ``TaspOptions.dkv_dtype``."""
    if "tokens_per_gpu" not in shape_hint:
        raise CostModelError("shape_hint needs at least 'tokens_per_gpu'")
    es = int(shape_hint.get("dtype_bytes", 2))
    hq = int(shape_hint.get("heads_q", 32))
    return Shape(tokens_per_gpu=int(shape_hint["tokens_per_gpu"]), batch=int(shape_hint.get("batch", 1)),
                 heads_q=hq, heads_kv=int(shape_hint.get("heads_kv", hq)),
                 head_dim=int(shape_hint.get("head_dim", 128)), causal=bool(shape_hint.get("causal", True)),
                 passes=str(shape_hint.get("passes", "fwd_bwd")), dtype_bytes=es,
                 dkv_bytes=es if dkv_dtype == "input" else 4)


def _hint_key(shape_hint: Mapping[str, Any]) -> tuple:
    return tuple(sorted((str(k), v) for k, v in shape_hint.items() if isinstance(v, (int, float, str, bool))))


def _valid_ks(topology: Topology, shape: Shape) -> list[int]:
    """Ring counts the topology can build and the local length can be split into (for large groups: 1..8,
    powers of two and the maximum, to keep the first call short)."""
    per_block = shape.tokens_per_gpu // 2 if shape.causal else shape.tokens_per_gpu
    ks = [k for k in ring_counts(topology) if k <= per_block]
    if len(ks) > 12:
        ks = [k for k in ks if k <= 8 or k & (k - 1) == 0 or k == ks[-1]]
    return ks


def _default_transport(topology: Topology, options: TaspOptions) -> str:
    """``options.transport`` when the model describes it (a2a, p2p), else a2a on one node, p2p across."""
    if options.transport in ("a2a", "p2p"):
        return options.transport
    return "p2p" if topology.multinode else "a2a"


def choose_num_rings(topology: Topology, shape_hint: Mapping[str, Any], *, options: TaspOptions | None = None,
                     margin: float = DEFAULT_MARGIN, transport: str | None = None, group: Any = None,
                     attention: Callable[..., Any] | None = None) -> int:
    """The ring count with the lowest predicted time; 1 unless another beats it by more than ``margin``
    both with the fitted compute/communication interference and with ideal overlap.

    Never returns a ring count the topology cannot build; returns 1 for CP size 2 (one ring is all there
    is) and whenever the hint cannot be modelled. ``group`` (a torch process group) and ``attention`` (the
    attention function to time, ``tasp_attention``) are used only with ``options.auto_probe``: the first call
    per shape then times the candidates on the group.
    """
    if topology.world_size <= 2:
        return 1
    opts = options or default_options()
    hkey = _hint_key(shape_hint)
    probed = _PROBED.get((topology, hkey))
    if probed is not None:
        return probed
    transport = transport or _default_transport(topology, opts)
    k = _model_choice(topology, hkey, margin, transport, calibration(opts), opts.dkv_dtype)
    if group is not None and attention is not None and opts.auto_probe:
        try:
            shape = shape_from_hint(shape_hint)
        except _MODEL_ERRORS:
            return k
        offered = ring_counts(topology)
        cands = [c for c in sorted({1, k, max(offered)}) if c in _valid_ks(topology, shape)]
        if len(cands) > 1:
            return probe_num_rings(group, cands, shape_hint, topology=topology, margin=margin, options=opts,
                                   attention=attention)
    return k


@lru_cache(maxsize=1024)
def _model_choice(topology: Topology, hkey: tuple, margin: float, transport: str, cal: Calibration,
                  dkv_dtype: str) -> int:
    try:
        shape = shape_from_hint(dict(hkey), dkv_dtype=dkv_dtype)
        ks = _valid_ks(topology, shape)
        if len(ks) <= 1:
            return 1
        scenarios = [cal] + ([replace(cal, interference=0.0)] if cal.interference > 0 else [])
        times = [{k: predict(topology, shape, k, c, transport=transport).total_ms for k in ks} for c in scenarios]
    except _MODEL_ERRORS:
        return 1  # cannot model this call: the ring schedule is the safe choice
    # robust to the least certain parameter: a k > 1 must beat 1 ring by the margin both with the fitted
    # compute/communication interference and with ideal overlap; the fitted model ranks the survivors
    ok = [k for k in ks if k == 1 or all(t[1] > t[k] * (1.0 + margin) for t in times)]
    return min(ok, key=lambda k: (times[0][k], k))


def choose_transport(topology: Topology, shape_hint: Mapping[str, Any], num_rings: int | None = None, *,
                     options: TaspOptions | None = None, margin: float = DEFAULT_MARGIN) -> str:
    """``a2a`` or ``p2p``, whichever the model predicts faster for ``num_rings`` (default: the auto choice);
    the default transport (``options.transport``, else a2a on one node, p2p across nodes) unless the other
    wins by more than ``margin``."""
    opts = options or default_options()
    default = _default_transport(topology, opts)
    if topology.world_size < 2:
        return default
    k = num_rings or choose_num_rings(topology, shape_hint, options=opts, margin=margin)
    return _transport_choice(topology, _hint_key(shape_hint), k, margin, default, calibration(opts), opts.dkv_dtype)


@lru_cache(maxsize=1024)
def _transport_choice(topology: Topology, hkey: tuple, k: int, margin: float, default: str, cal: Calibration,
                      dkv_dtype: str) -> str:
    try:
        shape = shape_from_hint(dict(hkey), dkv_dtype=dkv_dtype)
        t = {tr: predict(topology, shape, k, cal, transport=tr).total_ms for tr in ("a2a", "p2p")}
    except _MODEL_ERRORS:
        return default
    other = "p2p" if default == "a2a" else "a2a"
    return other if t[other] * (1.0 + margin) < t[default] else default


def choose_chunks(topology: Topology, shape_hint: Mapping[str, Any], num_rings: int, transport: str | None = None,
                  *, options: TaspOptions | None = None, margin: float = DEFAULT_MARGIN,
                  candidates: Sequence[int] = (1, 2, 4)) -> int:
    """Messages per piece and step for ``tasp_attention(chunks="auto")``: 1 unless the model predicts a gain.

    With c chunks a transfer that outlasts the block compute it overlaps, and the backward's last dK/dV
    hop, are exposed only for 1/c of their time (the first chunk's kernels start when it lands). The
    price is c times the kernel launches (host time per step) and ~4 % GPU time per extra lane. The
    predicted saving is ``hideable * (1 - 1/c)`` (transfer beyond the compute it overlaps plus the exposed last
    hop; the interference term stays); c > 1 is chosen only if it beats one chunk by
    ``margin``. On the 2-GPU nodes (h100-nv18-2, h200-nv18-2) this returns 1 for every benchmarked shape, as
    the chunked runs on 2x H100 measured.
    """
    opts = options or default_options()
    transport = transport or _default_transport(topology, opts)
    if topology.world_size < 2 or transport == "none":
        return 1
    return _chunks_choice(topology, _hint_key(shape_hint), num_rings, transport, margin, tuple(candidates),
                          calibration(opts), opts.dkv_dtype)


@lru_cache(maxsize=1024)
def _chunks_choice(topology: Topology, hkey: tuple, num_rings: int, transport: str, margin: float,
                   candidates: tuple[int, ...], cal: Calibration, dkv_dtype: str) -> int:
    try:
        shape = shape_from_hint(dict(hkey), dkv_dtype=dkv_dtype)
        p = predict(topology, shape, num_rings, cal, transport="p2p" if transport == "symm" else transport)
    except _MODEL_ERRORS:
        return 1
    per_block = shape.tokens_per_gpu // 2 if shape.causal else shape.tokens_per_gpu
    lane_host = (cal.host_fwd_ms * cal.host_step_frac_fwd +
                 (cal.host_bwd_ms * cal.host_step_frac_bwd if shape.passes == "fwd_bwd" else 0.0))
    lane_host *= topology.world_size - 1

    # what chunks can hide: transfer time beyond the compute it overlaps, and the exposed last hop home (not
    # the interference gamma * min(compute, comm): the transfer still runs beside the kernels)
    beyond = sum(max(0.0, s.comm_ms - s.compute_ms) for s in p.steps)
    hideable = beyond + (p.exposed_comm_ms - sum(s.exposed_ms for s in p.steps))

    def total(c: int) -> float:
        gpu = p.gpu_ms - hideable * (1.0 - 1.0 / c) + (c - 1) * CHUNK_GPU_COST * p.compute_ms
        return max(p.host_ms + (c - 1) * lane_host, cal.host_prefix_ms + gpu)
    ok = [c for c in candidates if c == 1 or (per_block >= num_rings * c and total(1) > total(c) * (1.0 + margin))]
    return min(ok, key=lambda c: (total(c), c)) if ok else 1


def probe_num_rings(group: Any, candidates: Sequence[int], shape_hint: Mapping[str, Any], *,
                    topology: Topology | None = None, margin: float = DEFAULT_MARGIN, passes: str | None = None,
                    warmup: int = 1, iters: int = 3, device: Any = None, remember: bool = True,
                    options: TaspOptions | None = None, attention: Callable[..., Any] | None = None) -> int:
    """Time each candidate ring count once on the real CP ``group`` and return the fastest (same on all ranks).

    ``attention`` is the function timed (``megatron_tasp.tasp_attention``, which passes itself when its
    first call probes); it is an argument so that this module never imports the engine.

    Runs ``tasp_attention`` forward (+ backward unless ``passes == "fwd"``) on random inputs of the hinted
    shape with ``options`` (num_rings and topology replaced), ``warmup`` + ``iters`` times per candidate,
    takes the median and the maximum over ranks. Ring count 1 wins unless another is faster by more than
    ``margin``. With ``remember`` the result is stored for ``choose_num_rings`` (same topology and hint).
    Collective: every rank of ``group`` must call it. Imports torch (only here).
    """
    import torch
    import torch.distributed as dist

    from megatron_tasp.topology import generic_topology

    if attention is None:
        raise CostModelError("probe_num_rings needs attention=megatron_tasp.tasp_attention (the function to time)")

    topo = topology or generic_topology(dist.get_world_size(group))
    cands = sorted({int(c) for c in candidates})
    if not cands:
        raise CostModelError("probe_num_rings needs at least one candidate")
    if device is None:
        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    device = torch.device(device)
    dtype = {2: torch.bfloat16, 4: torch.float32}.get(int(shape_hint.get("dtype_bytes", 2)), torch.bfloat16)
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU kernels are fp32 in practice; timing only
    s, b = int(shape_hint["tokens_per_gpu"]), int(shape_hint.get("batch", 1))
    hq = int(shape_hint.get("heads_q", 32))
    hkv, d = int(shape_hint.get("heads_kv", hq)), int(shape_hint.get("head_dim", 128))
    causal = bool(shape_hint.get("causal", True))
    bwd = (passes or str(shape_hint.get("passes", "fwd_bwd"))) != "fwd"
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(s, b, h, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(bwd)
               for h in (hq, hkv, hkv))
    # the candidates run eagerly: CUDA graphs would capture (and keep a graph pool) for every candidate
    base = (options or default_options()).replace(topology=topo, auto_probe=False, cuda_graphs=False)

    def run(kr: int) -> None:
        out = attention(q, k, v, group, causal=causal, options=base.replace(num_rings=kr))
        if bwd:
            out.backward(torch.ones_like(out))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[int, float] = {}
    for kr in cands:
        for _ in range(warmup):
            run(kr)
        samples = []
        for _ in range(max(iters, 1)):
            sync()
            t0 = time.perf_counter()
            run(kr)
            sync()
            samples.append(time.perf_counter() - t0)
        t = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times[kr] = float(t.item())
    best = min(times, key=lambda kr: (times[kr], kr))
    if 1 in times and best != 1 and times[1] <= times[best] * (1.0 + margin):
        best = 1
    if remember:
        _PROBED[(topo, _hint_key(shape_hint))] = best
        while len(_PROBED) > _PROBED_MAX:
            _PROBED.pop(next(iter(_PROBED)))
    return best
