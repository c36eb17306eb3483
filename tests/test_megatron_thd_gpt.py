"""End to end on packed documents (THD): a tiny Megatron GPTModel at CP 2 / 3 equals CP 1.

Several documents of mixed length, each padded to a multiple of 2·CP (padding at the document's end, loss
masked), packed into one sequence; Megatron's PackedSeqParams (unpadded ``cu_seqlens_q``, padded
``cu_seqlens_q_padded``), RoPE over the packed documents and this package's per-document batch split
(``megatron_tasp.megatron.thd_batch``). Loss and every gradient (summed over CP ranks) match a single-rank run
of the same batch. ``engine``: TASP's ``tasp_attention`` with ``cu_seqlens`` (the engine's THD path);
``reference``: an all-gather THD attention written here (checks the Megatron plumbing on its own).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

from megatron_tasp.launch import run_workers  # noqa: E402
from megatron_tasp.thd import host_bounds  # noqa: E402

SEQ = 48
VOCAB = 128
REAL = [5, 11, 2, 9, 1]  # real document lengths; a last document takes the rest of the sequence
LOSS_TOL = 1e-5
GRAD_TOL = 1e-5  # max-abs error relative to the parameter's max-abs gradient (fp32)


def layout(cu_pad: list[int], cp: int, rank: int) -> list[int]:
    """TE's THD split, written out independently of megatron_tasp.thd (the oracle's own copy)."""
    out: list[int] = []
    for a, b in zip(cu_pad[:-1], cu_pad[1:]):
        c = (b - a) // (2 * cp)
        out += list(range(a + rank * c, a + (rank + 1) * c)) + list(range(b - (rank + 1) * c, b - rank * c))
    return out


def packed_documents(cp: int, seed: int = 3) -> dict[str, Any]:
    """REAL documents padded to multiples of 2·cp, then one last document filling SEQ (padded too)."""
    g = 2 * cp
    cu, cu_pad = [0], [0]
    for n in REAL:  # cu: cumulative real lengths (TE's convention), cu_pad: cumulative padded lengths
        cu.append(cu[-1] + n)
        cu_pad.append(cu_pad[-1] + -(-n // g) * g)
    rest = SEQ - cu_pad[-1]
    assert rest >= g and rest % g == 0, (rest, g)
    cu.append(cu[-1] + rest - cp)  # the last document ends with cp padding tokens
    cu_pad.append(SEQ)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (1, SEQ + 1), generator=gen)
    real = torch.zeros(SEQ, dtype=torch.bool)
    pos = torch.zeros(SEQ, dtype=torch.long)
    for i in range(len(cu) - 1):
        real[cu_pad[i]:cu_pad[i] + cu[i + 1] - cu[i]] = True
        pos[cu_pad[i]:cu_pad[i + 1]] = torch.arange(cu_pad[i + 1] - cu_pad[i])
    toks = tokens[:, :-1].masked_fill(~real[None], 0)
    return {"tokens": toks.contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": real[None].float(),
            "position_ids": pos[None].contiguous(), "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "cu_seqlens_padded": torch.tensor(cu_pad, dtype=torch.int32)}


class _Gather(torch.autograd.Function):
    """All-gather along dim 0; backward: the all-reduced gradient's own slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def reference_thd_attention(q, k, v, cp_group, *, causal=True, cu_seqlens_padded=None, cu_seqlens=None,
                            softmax_scale=None, **options):
    """Exact packed attention on THD shards (fp32): same document, causal within it, padding attends nothing."""
    cp = 1 if cp_group is None else dist.get_world_size(cp_group)
    rank = 0 if cp_group is None else dist.get_rank(cp_group)
    cu_pad = host_bounds(cu_seqlens_padded)  # tensors or the adapter's host tuples
    cu = host_bounds(cu_seqlens if cu_seqlens is not None else cu_seqlens_padded)
    doc = torch.zeros(cu_pad[-1], dtype=torch.long)
    pos = torch.zeros(cu_pad[-1], dtype=torch.long)
    real = torch.zeros(cu_pad[-1], dtype=torch.bool)
    for i in range(len(cu_pad) - 1):
        doc[cu_pad[i]:cu_pad[i + 1]] = i
        pos[cu_pad[i]:cu_pad[i + 1]] = torch.arange(cu_pad[i + 1] - cu_pad[i])
        real[cu_pad[i]:cu_pad[i] + cu[i + 1] - cu[i]] = True
    qi = torch.tensor(layout(cu_pad, cp, rank))
    ki = torch.tensor(sum((layout(cu_pad, cp, j) for j in range(cp)), []))
    if cp > 1:
        k, v = _Gather.apply(k, cp_group), _Gather.apply(v, cp_group)
    rep = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    qf, kf, vf = (x.float().transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
    allowed = (doc[qi][:, None] == doc[ki][None]) & real[qi][:, None] & real[ki][None]
    if causal:
        allowed &= pos[ki][None] <= pos[qi][:, None]
    scores = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    rows = allowed.any(-1)
    scores = scores.masked_fill(~rows[:, None], 0.0)
    out = (torch.softmax(scores, -1) @ vf) * rows[None, :, None].float()
    return out.transpose(0, 1).to(q.dtype)


def thd_gpt_worker(rank: int, world: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Forward + backward of a tiny GPTModel on the packed batch at CP = world."""
    H.import_megatron()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_tasp.megatron.spec import gpt_tasp_local_spec
    from megatron_tasp.megatron.thd_batch import get_thd_batch_on_this_cp_rank

    if opts["impl"] == "reference":
        sys.modules["megatron_tasp.attention"] = types.SimpleNamespace(tasp_attention=reference_thd_attention)
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    try:
        model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
        config = H.tiny_config(world)
        model = GPTModel(config=config, transformer_layer_spec=gpt_tasp_local_spec(config), vocab_size=VOCAB,
                         max_sequence_length=SEQ, position_embedding_type=opts["position"])
        full = packed_documents(opts["pad_cp"])
        cu, cu_pad = full["cu_seqlens"], full["cu_seqlens_padded"]
        group = parallel_state.get_context_parallel_group()
        local = get_thd_batch_on_this_cp_rank({k: full[k].clone() for k in ("tokens", "labels", "loss_mask",
                                                                            "position_ids")}, cu_pad, group)
        longest = int((cu_pad[1:] - cu_pad[:-1]).max())
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                                 cu_seqlens_kv_padded=cu_pad, max_seqlen_q=longest, max_seqlen_kv=longest)
        loss = model(input_ids=local["tokens"], position_ids=local["position_ids"], attention_mask=None,
                     labels=local["labels"], packed_seq_params=packed)      # [1, t_local]
        ((loss * local["loss_mask"]).sum() / full["loss_mask"].sum()).backward()
        grads = {}
        for name, p in model.named_parameters():
            g = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            if world > 1:
                dist.all_reduce(g, group=group)
            grads[name] = g
        parts = [torch.empty_like(loss) for _ in range(world)]
        dist.all_gather(parts, loss.detach().contiguous(), group=group)
        full_loss = torch.empty(SEQ)
        for r, part in enumerate(parts):
            full_loss[layout(cu_pad.tolist(), world, r)] = part[0]
        return {"loss": full_loss, "real": full["loss_mask"][0].bool(), "grads": grads if rank == 0 else None}
    finally:
        parallel_state.destroy_model_parallel()


_REFS: dict[tuple, dict] = {}


def _run(cp: int, impl: str, position: str, pad_cp: int) -> dict:
    return run_workers(thd_gpt_worker, cp, {"impl": impl, "position": position, "pad_cp": pad_cp},
                       timeout_s=300)[0]


@pytest.mark.parametrize("cp,impl,position", [
    (2, "engine", "rope"),
    (3, "engine", "rope"),
    (2, "engine", "learned_absolute"),
    (2, "reference", "rope"),
    (3, "reference", "rope"),
])
def test_packed_gpt_cp_matches_cp1(cp, impl, position):
    """``engine`` cases need the engine's THD path (tasp_attention with cu_seqlens_padded / cu_seqlens)."""
    key = (impl, position, cp)
    if key not in _REFS:
        _REFS[key] = _run(1, impl, position, cp)
    ref, got = _REFS[key], _run(cp, impl, position, cp)
    real = ref["real"]
    assert real.sum() < SEQ  # the batch has padding
    denom = max(1.0, float(ref["loss"][real].abs().max()))
    loss_err = float((got["loss"][real] - ref["loss"][real]).abs().max()) / denom
    assert loss_err < LOSS_TOL, loss_err
    grad_err, where = H.max_grad_error(got["grads"], ref["grads"])
    assert grad_err < GRAD_TOL, (grad_err, where)


def test_reference_cp1_equals_separate_documents():
    """The oracle itself: packed attention at CP 1 equals attention over each document's real tokens alone."""
    full = packed_documents(2)
    cu, cu_pad = full["cu_seqlens"].tolist(), full["cu_seqlens_padded"].tolist()
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(SEQ, 4, 8, generator=gen), torch.randn(SEQ, 2, 8, generator=gen), \
        torch.randn(SEQ, 2, 8, generator=gen)
    out = reference_thd_attention(q, k, v, None, cu_seqlens_padded=full["cu_seqlens_padded"],
                                  cu_seqlens=full["cu_seqlens"])
    for i in range(len(cu) - 1):
        a, n = cu_pad[i], cu[i + 1] - cu[i]
        assert 0 < n <= cu_pad[i + 1] - a
        qd, kd, vd = (x[a:a + n].transpose(0, 1) for x in (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))
        s = (qd @ kd.transpose(-1, -2) / 8 ** 0.5).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e30)
        torch.testing.assert_close(out[a:a + n], (torch.softmax(s, -1) @ vd).transpose(0, 1))
        assert not out[a + n:cu_pad[i + 1]].any()  # padding tokens: output 0
