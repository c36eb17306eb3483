"""cuDNN's ragged attention on one GPU: could a CP=2 rank of packed documents run ONE launch per direction
instead of two?

    python scripts/gpu_cudnn_fused_rank.py --out fused_rank.json

Rank 1 of CP=2 holds chunks 1 and 2 of every document and sees chunk 0 of its peer. The engine runs two launches
per direction: the own block (chunks 1-2 against themselves, causal, top-left) and the remote block (chunks 1-2
against chunk 0, full), merges the forward outputs and adds the two dQ. One launch could do it all: the K/V of
chunks 0-2 of every document gathered back to back, with a bottom-right causal mask (a query sees chunk 0 whole
and its own chunks up to itself). Same FLOPs; one set of cuDNN's per-row kernels (dO.O, dQ conversion, GQA head
sums) instead of two; no merge and no dQ add. Timed here: the two launches with their merge and dQ add, the one
bottom-right launch (its K/V gather included), and the same one launch without a mask (the full rectangle, for
what skipping masked tiles saves). Also: how far the one launch's results lie from the two launches'.
The bottom-right mask is requested from this script only (the engine's blocks never need it): the library's
graph builder is given a view of the ``cudnn`` module whose top-left alignment reads bottom-right.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_tasp.apps.bench.timing import time_back_to_back
from megatron_tasp.kernels import cudnn_varlen as cv
from megatron_tasp.kernels.fused_merge import merge_to


class _BottomRight:
    """The ``cudnn`` module with ``diagonal_alignment.TOP_LEFT`` reading ``BOTTOM_RIGHT``."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        if name == "diagonal_alignment":
            return type("Alignment", (), {"TOP_LEFT": self._module.diagonal_alignment.BOTTOM_RIGHT})
        return getattr(self._module, name)


class _BottomRightRagged(cv._CudnnRagged):
    def _build(self, cudnn: Any, handle: Any, backward: bool, key: tuple) -> Any:
        return super()._build(_BottomRight(cudnn), handle, backward, key)


def _kernels(fn, n: int = 5) -> dict[str, float]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    ks = {e.key[:60]: round(e.device_time_total / n, 1) for e in p.key_averages() if e.device_time_total > 0}
    return dict(sorted(ks.items(), key=lambda x: -x[1])[:10])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", default="2048,1024,359,872,2024,1865", help="chunk rows per document")
    ap.add_argument("--heads", default="32/8", help="query/KV heads")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda", 0)
    cs = [int(x) for x in a.chunks.split(",")]
    hq, hkv = (int(x) for x in a.heads.split("/"))
    d, rows = 128, 2 * sum(cs)
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(h: int) -> torch.Tensor:
        return torch.randn(rows, h, d, device=dev, dtype=torch.bfloat16, generator=g)

    q, do = rand(hq), rand(hq)
    k_own, v_own, k_peer, v_peer = rand(hkv), rand(hkv), rand(hkv), rand(hkv)  # per document [c1 c2] / [c0 c3]
    qs = [2 * sum(cs[:i]) for i in range(len(cs) + 1)]
    ks = [3 * sum(cs[:i]) for i in range(len(cs) + 1)]

    def spans(pairs: list[list[int]]) -> torch.Tensor:
        return torch.tensor(pairs, dtype=torch.int32, device=dev)

    docs = spans([[qs[i], qs[i + 1]] for i in range(len(cs))])
    front = spans([[qs[i], qs[i] + cs[i]] for i in range(len(cs))])
    fused_k = spans([[ks[i], ks[i + 1]] for i in range(len(cs))])
    # rows of [peer ; own] K/V that make chunks 0, 1, 2 of each document back to back
    gather = torch.cat([torch.cat((torch.arange(qs[i], qs[i] + cs[i]), torch.arange(qs[i], qs[i + 1]) + rows))
                        for i in range(len(cs))]).to(dev)
    kv_src = torch.cat((torch.stack((k_peer, v_peer), 1), torch.stack((k_own, v_own), 1)))
    scale, mq, mk = d ** -0.5, max(qs[i + 1] - qs[i] for i in range(len(cs))), 3 * max(cs)
    top_left, bottom_right = cv._CudnnRagged(), _BottomRightRagged()

    def two() -> tuple[torch.Tensor, ...]:
        o, lse, _ = top_left.forward(q, k_own, v_own, docs, docs, mq, mq, True, scale)
        o2, lse2, _ = top_left.forward(q, k_peer, v_peer, docs, front, mq, max(cs), False, scale)
        out, lse4 = o.transpose(0, 1).unsqueeze(0), lse.unsqueeze(0)
        merge_to(out, lse4, o2.transpose(0, 1).unsqueeze(0), lse2.unsqueeze(0), out, lse4)
        dq, _, _ = top_left.backward(do, q, k_own, v_own, o, lse4[0], docs, docs, mq, mq, True, scale, None)
        dq2, _, _ = top_left.backward(do, q, k_peer, v_peer, o, lse4[0], docs, front, mq, max(cs), False, scale,
                                      None)
        return o, lse4[0], dq + dq2

    def one(causal: bool = True) -> tuple[torch.Tensor, ...]:
        kv = kv_src.index_select(0, gather)
        st = bottom_right if causal else top_left
        o, lse, _ = st.forward(q, kv[:, 0], kv[:, 1], docs, fused_k, mq, mk, causal, scale)
        dq, _, _ = st.backward(do, q, kv[:, 0], kv[:, 1], o, lse, docs, fused_k, mq, mk, causal, scale, None)
        return o, lse, dq

    ref, fused = two(), one()
    res: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                 "cudnn": torch.backends.cudnn.version(), "chunks": cs, "heads": a.heads, "dtype": "bfloat16",
                 "max_abs_diff": {n: float((x.float() - y.float()).abs().max())
                                  for n, x, y in zip(("out", "lse", "dq"), ref, fused)}}
    fns = {"two_launches": two, "one_bottom_right": one, "one_full_rectangle": lambda: one(False)}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for f in fns.values():
        f()
    for _ in range(a.rounds):
        for n, f in fns.items():
            times[n].append(time_back_to_back(f, dev, 2, a.iters, rounds=1))
    res["fwd_bwd_ms"] = {n: statistics.median(t) for n, t in times.items()}
    res["kernels_us_per_call"] = {n: _kernels(f) for n, f in fns.items()}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
