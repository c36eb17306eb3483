"""Automatic ring count (``tasp_attention(num_rings="auto")``) from the cost model, plus an optional probe.

``choose_num_rings(topology, shape_hint)`` predicts the time of every ring count the topology can build with
:mod:`megatron_tasp.costmodel` and returns the fastest, but only leaves the 1-ring schedule (zigzag ring
attention) when the predicted gain exceeds a margin (3 %): the model's error on the calibration machine is a
few percent, so smaller predicted gains are noise and the ring schedule is the safe choice. The gain must
hold both with the fitted compute/communication interference and with ideal overlap (interference 0), the
parameter whose transfer to other machines is least certain (docs/COSTMODEL.md).

* Calibration: the constants shipped in :data:`megatron_tasp.costmodel.DEFAULT_CALIBRATION_DICT` (fitted on
  the 2x H100 benchmark), or ``MEGATRON_TASP_CALIBRATION=FILE`` (a calibration JSON written by
  ``megatron-tasp simulate --save-calibration`` or a benchmark records file, calibrated on first use).
* The pass is assumed to be forward + backward (training) unless the hint says ``passes: "fwd"``.
* Pure Python; results are cached per (topology, shape, calibration, environment), so repeated calls cost
  a dictionary lookup.
* ``probe_num_rings(group, candidates, shape_hint)`` times candidates once on the real CP group (torch) and
  remembers the winner for that topology and shape; ``choose_num_rings`` returns a remembered probe result
  before consulting the model. With ``MEGATRON_TASP_AUTO_PROBE=1`` and a ``group`` passed to
  ``choose_num_rings``, the probe runs automatically the first time a shape is seen.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from megatron_tasp.costmodel import (
    Calibration,
    CostModelError,
    Shape,
    default_calibration,
    load_calibration,
    predict,
    ring_counts,
)
from megatron_tasp.topology import Topology

__all__ = ["DEFAULT_MARGIN", "calibration", "choose_chunks", "choose_num_rings", "choose_transport", "probe_num_rings",
           "shape_from_hint"]

DEFAULT_MARGIN = 0.03  # leave the 1-ring schedule only for a predicted gain above 3 %

_CALIB: dict[tuple, Calibration] = {}
_CHOICES: dict[tuple, int] = {}
_TRANSPORTS: dict[tuple, str] = {}
_PROBED: dict[tuple, int] = {}


def calibration() -> Calibration:
    """The calibration in use: ``MEGATRON_TASP_CALIBRATION`` if set (cached per path and mtime), else the
    shipped default."""
    path = os.environ.get("MEGATRON_TASP_CALIBRATION")
    if not path:
        key: tuple = ("default",)
    else:
        p = Path(path)
        if not p.exists():
            raise CostModelError(f"MEGATRON_TASP_CALIBRATION={path}: file not found")
        key = (str(p.resolve()), p.stat().st_mtime_ns)
    cal = _CALIB.get(key)
    if cal is None:
        cal = _CALIB[key] = default_calibration() if key == ("default",) else load_calibration(path)
    return cal


def _dkv_bytes(dtype_bytes: int) -> int:
    mode = os.environ.get("MEGATRON_TASP_DKV_DTYPE", "fp32").lower()
    return dtype_bytes if mode == "input" else 4


def shape_from_hint(shape_hint: dict[str, Any]) -> Shape:
    """A cost-model Shape from ``tasp_attention``'s hint (tokens_per_gpu, batch, heads_q, heads_kv, head_dim,
    causal, dtype_bytes; optional passes, default fwd_bwd)."""
    if "tokens_per_gpu" not in shape_hint:
        raise CostModelError("shape_hint needs at least 'tokens_per_gpu'")
    es = int(shape_hint.get("dtype_bytes", 2))
    hq = int(shape_hint.get("heads_q", 32))
    return Shape(tokens_per_gpu=int(shape_hint["tokens_per_gpu"]), batch=int(shape_hint.get("batch", 1)),
                 heads_q=hq, heads_kv=int(shape_hint.get("heads_kv", hq)),
                 head_dim=int(shape_hint.get("head_dim", 128)), causal=bool(shape_hint.get("causal", True)),
                 passes=str(shape_hint.get("passes", "fwd_bwd")), dtype_bytes=es, dkv_bytes=_dkv_bytes(es))


def _hint_key(shape_hint: dict[str, Any]) -> tuple:
    return tuple(sorted((str(k), v) for k, v in shape_hint.items() if isinstance(v, (int, float, str, bool))))


def _valid_ks(topology: Topology, shape: Shape) -> list[int]:
    """Ring counts the topology can build and the local length can be split into (for large groups: 1..8,
    powers of two and the maximum, to keep the first call short)."""
    per_block = shape.tokens_per_gpu // 2 if shape.causal else shape.tokens_per_gpu
    ks = [k for k in ring_counts(topology) if k <= per_block]
    if len(ks) > 12:
        ks = [k for k in ks if k <= 8 or k & (k - 1) == 0 or k == ks[-1]]
    return ks


def _default_transport(topology: Topology) -> str:
    env = os.environ.get("MEGATRON_TASP_TRANSPORT")
    if env in ("a2a", "p2p"):
        return env
    return "p2p" if topology.multinode else "a2a"


def choose_num_rings(topology: Topology, shape_hint: dict[str, Any], *, margin: float = DEFAULT_MARGIN,
                     transport: str | None = None, group: Any = None) -> int:
    """The ring count with the lowest predicted time; 1 unless another beats it by more than ``margin``
    both with the fitted compute/communication interference and with ideal overlap.

    Never returns a ring count the topology cannot build; returns 1 for CP size 2 (one ring is all there
    is) and whenever the hint cannot be modelled. ``group`` (a torch process group) is only used with
    ``MEGATRON_TASP_AUTO_PROBE=1``: the first call per shape then times the candidates on it.
    """
    n = topology.world_size
    if n <= 2:
        return 1
    hkey = _hint_key(shape_hint)
    probed = _PROBED.get((topology, hkey))
    if probed is not None:
        return probed
    transport = transport or _default_transport(topology)
    key = (topology, hkey, margin, transport, id(calibration()), os.environ.get("MEGATRON_TASP_DKV_DTYPE"))
    k = _CHOICES.get(key)
    if k is None:
        k = _CHOICES[key] = _model_choice(topology, shape_hint, margin, transport)
    if group is not None and os.environ.get("MEGATRON_TASP_AUTO_PROBE") == "1":
        cands = sorted({1, k, *([max(ring_counts(topology))] if ring_counts(topology) else [])})
        try:
            shape = shape_from_hint(shape_hint)
        except CostModelError:
            return k
        cands = [c for c in cands if c in _valid_ks(topology, shape)]
        if len(cands) > 1:
            return probe_num_rings(group, cands, shape_hint, topology=topology, margin=margin)
    return k


def _model_choice(topology: Topology, shape_hint: dict[str, Any], margin: float, transport: str) -> int:
    try:
        shape = shape_from_hint(shape_hint)
        ks = _valid_ks(topology, shape)
        if len(ks) <= 1:
            return 1
        cal = calibration()
        scenarios = [cal] + ([replace(cal, interference=0.0)] if cal.interference > 0 else [])
        times = [{k: predict(topology, shape, k, c, transport=transport).total_ms for k in ks} for c in scenarios]
    except (CostModelError, ValueError, KeyError, TypeError):
        return 1  # cannot model this call: the ring schedule is the safe choice
    # robust to the least certain parameter: a k > 1 must beat 1 ring by the margin both with the fitted
    # compute/communication interference and with ideal overlap; the fitted model ranks the survivors
    ok = [k for k in ks if k == 1 or all(t[1] > t[k] * (1.0 + margin) for t in times)]
    return min(ok, key=lambda k: (times[0][k], k))


def choose_transport(topology: Topology, shape_hint: dict[str, Any], num_rings: int | None = None, *,
                     margin: float = DEFAULT_MARGIN) -> str:
    """``a2a`` or ``p2p``, whichever the model predicts faster for ``num_rings`` (default: the auto choice);
    the default transport (a2a on one node, p2p across nodes) unless the other wins by more than ``margin``.
    """
    default = _default_transport(topology)
    if topology.world_size < 2:
        return default
    k = num_rings or choose_num_rings(topology, shape_hint, margin=margin)
    key = (topology, _hint_key(shape_hint), k, margin, id(calibration()), os.environ.get("MEGATRON_TASP_DKV_DTYPE"))
    if key in _TRANSPORTS:
        return _TRANSPORTS[key]
    choice = default
    try:
        shape = shape_from_hint(shape_hint)
        cal = calibration()
        t = {tr: predict(topology, shape, k, cal, transport=tr).total_ms for tr in ("a2a", "p2p")}
        other = "p2p" if default == "a2a" else "a2a"
        if t[other] * (1.0 + margin) < t[default]:
            choice = other
    except (CostModelError, ValueError, KeyError, TypeError):
        pass
    _TRANSPORTS[key] = choice
    return choice


def probe_num_rings(group: Any, candidates: Sequence[int], shape_hint: dict[str, Any], *,
                    topology: Topology | None = None, margin: float = DEFAULT_MARGIN, passes: str | None = None,
                    warmup: int = 1, iters: int = 3, device: Any = None, remember: bool = True) -> int:
    """Time each candidate ring count once on the real CP ``group`` and return the fastest (same on all ranks).

    Runs ``tasp_attention`` forward (+ backward unless ``passes == "fwd"``) on random inputs of the hinted
    shape, ``warmup`` + ``iters`` times per candidate, takes the median and the maximum over ranks. Ring
    count 1 wins unless another is faster by more than ``margin``. With ``remember`` the result is stored
    for ``choose_num_rings`` (same topology and hint). Collective: every rank of ``group`` must call it.
    """
    import torch
    import torch.distributed as dist

    from megatron_tasp.attention import tasp_attention
    from megatron_tasp.topology import generic_topology

    n = dist.get_world_size(group)
    topo = topology or generic_topology(n)
    cands = sorted({int(c) for c in candidates})
    if not cands:
        raise CostModelError("probe_num_rings needs at least one candidate")
    if device is None:
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    es = int(shape_hint.get("dtype_bytes", 2))
    dtype = {2: torch.bfloat16, 4: torch.float32}.get(es, torch.bfloat16)
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU kernels are fp32 in practice; timing only
    s = int(shape_hint["tokens_per_gpu"])
    b, hq = int(shape_hint.get("batch", 1)), int(shape_hint.get("heads_q", 32))
    hkv, d = int(shape_hint.get("heads_kv", hq)), int(shape_hint.get("head_dim", 128))
    causal = bool(shape_hint.get("causal", True))
    bwd = (passes or str(shape_hint.get("passes", "fwd_bwd"))) != "fwd"
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(s, b, h, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(bwd)
               for h in (hq, hkv, hkv))

    def run(kr: int) -> None:
        out = tasp_attention(q, k, v, group, causal=causal, num_rings=kr, topology=topo)
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
    return best


#: Measured on 2x H100 (compute-only runs with 2 and 4 chunks): each extra lane costs about 4 % more GPU time
#: (smaller kernels, one more merge per step), on top of its host launch cost.
CHUNK_GPU_COST = 0.04
_CHUNKS: dict[tuple, int] = {}


def choose_chunks(topology: Topology, shape_hint: dict[str, Any], num_rings: int, transport: str | None = None, *,
                  margin: float = DEFAULT_MARGIN, candidates: Sequence[int] = (1, 2, 4)) -> int:
    """Messages per piece and step for ``tasp_attention(chunks="auto")``: 1 unless the model predicts a gain.

    With c chunks a transfer that outlasts the block compute it overlaps, and the backward's last dK/dV
    hop, are exposed only for 1/c of their time (the first chunk's kernels start when it lands). The
    price is c times the kernel launches (host time per step) and ~4 % GPU time per extra lane. The
    predicted saving is ``exposed_comm * (1 - 1/c)``; c > 1 is chosen only if it beats one chunk by
    ``margin``. On the measured 2x H100 node this returns 1 for every benchmarked shape, as measured.
    """
    transport = transport or _default_transport(topology)
    if topology.world_size < 2 or transport == "none":
        return 1
    key = (topology, _hint_key(shape_hint), num_rings, transport, margin, tuple(candidates), id(calibration()))
    c = _CHUNKS.get(key)
    if c is not None:
        return c
    try:
        shape = shape_from_hint(shape_hint)
        cal = calibration()
        p = predict(topology, shape, num_rings, cal, transport="p2p" if transport == "symm" else transport)
        per_block = shape.tokens_per_gpu // 2 if shape.causal else shape.tokens_per_gpu
        lane_host = (cal.host_fwd_ms * cal.host_step_frac_fwd +
                     (cal.host_bwd_ms * cal.host_step_frac_bwd if shape.passes == "fwd_bwd" else 0.0))
        lane_host *= topology.world_size - 1

        def total(c_: int) -> float:
            gpu = p.gpu_ms - p.exposed_comm_ms * (1.0 - 1.0 / c_) + (c_ - 1) * CHUNK_GPU_COST * p.compute_ms
            host = p.host_ms + (c_ - 1) * lane_host
            return max(host, cal.host_prefix_ms + gpu)
        ok = [c_ for c_ in candidates if c_ == 1 or (per_block >= num_rings * c_ and
                                                    total(1) > total(c_) * (1.0 + margin))]
        c = min(ok, key=lambda c_: (total(c_), c_)) if ok else 1
    except (CostModelError, ValueError, KeyError, TypeError):
        c = 1
    _CHUNKS[key] = c
    return c
