"""A float64 reference of the packed varlen attention ops (``megatron_tasp.kernels.varlen.VarlenOps``): the
same contract as torch's flash varlen forward/backward, per segment in plain torch, so the varlen block's
gather/scatter plumbing runs on CPU. Causal segments are square (the only kind the engine passes; or one query
row longer, top-left: a span lent a row at its end, ``VarlenOps.even_spans``) unless one side is empty. A
segment empty on one side computes nothing, as in FlashAttention-2: output 0 and lse +inf for queries without
keys, dq 0 for them and dk/dv 0 for keys without queries."""

from __future__ import annotations

import torch

from megatron_tasp.kernels.varlen import VarlenOps, spans_of

CALLS = {"forward": 0, "backward": 0, "spans": 0}


def _segments(cu_q, cu_k):
    """(query rows, key rows) per segment of ``cu_seqlens`` or of spans."""
    (fq, lq), (fk, lk) = spans_of(cu_q), spans_of(cu_k)
    for a, n, b, m in zip(fq.tolist(), lq.tolist(), fk.tolist(), lk.tolist()):
        yield slice(a, a + n), slice(b, b + m)


def _scores(q, k, causal, scale):
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(g, 1)) * scale
    if causal:
        assert q.shape[0] - k.shape[0] in (0, 1), "causal segments are square (or lent one query row at the end)"
        s = s.masked_fill(~torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(), float("-inf"))
    return s, g


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    CALLS["forward"] += 1
    out = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)
    for sq, sk in _segments(cu_q, cu_k):
        assert sq.stop - sq.start <= max_q and sk.stop - sk.start <= max_k
        if sk.stop == sk.start or sq.stop == sq.start:
            lse[:, sq] = float("inf")
            continue
        s, g = _scores(q[sq], k[sk], causal, scale)
        out[sq] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[sk].double().repeat_interleave(g, 1)).to(q.dtype)
        lse[:, sq] = s.logsumexp(-1).float()
    return out, lse, ("rng", "unused")


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, aux):
    CALLS["backward"] += 1
    assert aux == ("rng", "unused")
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v))
    for sq, sk in _segments(cu_q, cu_k):
        if sk.stop == sk.start or sq.stop == sq.start:
            continue
        s, g = _scores(q[sq], k[sk], causal, scale)
        p = torch.exp(s - lse[:, sq].double()[..., None])
        do, o = dout[sq].double(), out[sq].double()
        vg, kg = v[sk].double().repeat_interleave(g, 1), k[sk].double().repeat_interleave(g, 1)
        dvg = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, vg)
        ds = p * (dp - (do * o).sum(-1).t()[..., None])
        dq[sq] = torch.einsum("hqk,khd->qhd", ds, kg) * scale
        dkg = torch.einsum("hqk,qhd->khd", ds, q[sq].double()) * scale
        hk = k.shape[1]
        dk[sk] = dkg.reshape(dkg.shape[0], hk, g, -1).sum(2)
        dv[sk] = dvg.reshape(dvg.shape[0], hk, g, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


REFERENCE_OPS = VarlenOps(forward, backward)


def _unset_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out, lse, aux = forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    for sq, sk in _segments(cu_q, cu_k):
        if sk.stop == sk.start:  # queries without keys: left as garbage, as a pair may
            out[sq] = float("nan")
            lse[:, sq] = float("nan")
    return out, lse, aux


def _unset_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, aux):
    dq, dk, dv = backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, aux)
    for sq, sk in _segments(cu_q, cu_k):
        if sk.stop == sk.start:
            dq[sq] = float("nan")
        if sq.stop == sq.start:
            dk[sk] = float("nan")
            dv[sk] = float("nan")
    return dq, dk, dv


#: the reference, but the rows of segments empty on one side are left NaN (a pair may leave them unset; the
#: block must write them)
UNSET_OPS = VarlenOps(_unset_forward, _unset_backward)



def _outside(rows: int, spans) -> torch.Tensor:
    """Rows in no span (bool mask)."""
    out = torch.ones(rows, dtype=torch.bool)
    for a, b in spans.tolist():
        out[a:b] = False
    return out


def _spans_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    assert cu_q.dim() == cu_k.dim(), "spans on both sides or on neither"
    if cu_q.dim() == 1:  # a block that gathers its rows gives cu_seqlens
        return _unset_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    CALLS["spans"] += 1
    out, lse, aux = forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    free = _outside(q.shape[0], cu_q)
    out[free] = float("nan")
    lse[:, free] = float("nan")
    return out, lse, aux


def _spans_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, aux):
    assert cu_q.dim() == cu_k.dim()
    if cu_q.dim() == 1:
        return _unset_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, aux)
    dq, dk, dv = backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, aux)
    dq[_outside(q.shape[0], cu_q)] = float("nan")
    free = _outside(k.shape[0], cu_k)
    dk[free] = float("nan")
    dv[free] = float("nan")
    if k.stride(0) == 2 * k[0].numel() and v.data_ptr() - k.data_ptr() == k[0].numel() * k.element_size():
        pair = torch.stack((dk, dv), dim=1)  # K/V are the halves of a received piece: so are dK/dV (as cuDNN's)
        dk, dv = pair[:, 0], pair[:, 1]
    return dq, dk, dv


#: a pair that takes spans, as cuDNN's does, and leaves every row outside them NaN (never touched); for K/V
#: given as the halves of one buffer it returns dK/dV likewise; given cu_seqlens (blocks that gather), it acts
#: as UNSET_OPS. Like cuDNN's, it asks for even query spans (blocks lend odd ones a row without a partner)
SPANS_OPS = VarlenOps(_spans_forward, _spans_backward, spans=lambda q: True, even_spans=True)
