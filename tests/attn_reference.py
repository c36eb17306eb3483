"""Float64 reference attention and zigzag sharding helpers for the attention tests."""

from __future__ import annotations

import torch


def reference_attention(q, k, v, causal: bool, scale: float | None = None):
    """Full softmax attention in float64. q [S, b, h, d], k/v [S, b, hkv, d] -> [S, b, h, d]."""
    s, b, h, d = q.shape
    g = h // k.shape[2]
    scale = scale if scale is not None else d ** -0.5
    qd, kd, vd = (x.double().permute(1, 2, 0, 3) for x in (q, k, v))
    kd = kd.repeat_interleave(g, dim=1)
    vd = vd.repeat_interleave(g, dim=1)
    scores = qd @ kd.transpose(-1, -2) * scale
    if causal:
        mask = torch.ones(s, k.shape[0], dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vd).permute(2, 0, 1, 3)


def zigzag_index(seq: int, n: int, rank: int) -> torch.Tensor:
    """Global positions held by ``rank`` in Megatron's zigzag layout (blocks r and 2n-1-r)."""
    blk = seq // (2 * n)
    a = torch.arange(rank * blk, (rank + 1) * blk)
    b = torch.arange((2 * n - 1 - rank) * blk, (2 * n - rank) * blk)
    return torch.cat([a, b])


def contiguous_index(seq: int, n: int, rank: int) -> torch.Tensor:
    """Positions of an even contiguous split (last ranks may get one fewer)."""
    sizes = [seq // n + (1 if r < seq % n else 0) for r in range(n)]
    start = sum(sizes[:rank])
    return torch.arange(start, start + sizes[rank])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def document_mask(cu_pad, cu, causal: bool) -> torch.Tensor:
    """[S, S] bool: query i may see key j (same document, both real tokens, j <= i if causal) for packed
    documents with padded boundaries ``cu_pad`` and real lengths from ``cu``."""
    cu_pad, cu = [int(x) for x in cu_pad], [int(x) for x in cu]
    s = cu_pad[-1]
    doc = torch.full((s,), -1, dtype=torch.long)
    for i in range(len(cu_pad) - 1):
        real = cu[i + 1] - cu[i]
        doc[cu_pad[i]:cu_pad[i] + real] = i  # padding keeps -1: sees nothing, seen by nothing
    mask = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    if causal:
        mask &= torch.ones(s, s, dtype=torch.bool).tril()
    return mask


def reference_documents(q, k, v, cu_pad, cu, causal: bool, scale: float | None = None):
    """Document-masked softmax attention in float64 over a whole packed sequence. q [S, h, d], k/v
    [S, hkv, d] -> [S, h, d]; rows that see no key (padding) are 0, and so are the gradients through them."""
    s, h, d = q.shape
    g = h // k.shape[1]
    scale = scale if scale is not None else d ** -0.5
    qd, kd, vd = (x.double().permute(1, 0, 2) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(g, dim=0), vd.repeat_interleave(g, dim=0)
    mask = document_mask(cu_pad, cu, causal)
    seen = mask.any(-1)
    mask = mask | ~seen[:, None]  # keep empty rows finite, then zero them
    scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ vd) * seen[None, :, None]
    return out.permute(1, 0, 2)
