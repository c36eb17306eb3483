"""CPU tests of the block-attention kernel layer (megatron_tasp.kernels).

Tolerances, as max|x - ref| / max|ref| against a float64 softmax attention computed from the SAME (rounded)
inputs; lse is compared as max absolute error (lse values are O(1..10)):

* float32: out, lse, dq/dk/dv 1e-5 (measured: <= 6e-7).
* bfloat16: out 1e-2, lse 1e-3, dq/dk/dv 3e-2 (measured: out 3e-3, lse 7e-5, grads 8e-3; bf16 has 8 mantissa
  bits, 2^-8 = 4e-3 per rounding, the CPU kernel rounds P to bf16, and the merged out is rounded to bf16
  before the per-block backward).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tasp import clear_plan_cache, tasp_attention, tasp_run_summary
from megatron_tasp.kernels import (
    EXPERIMENTAL_KERNELS,
    BlockAttention,
    auto_order,
    available_kernels,
    get_kernel,
    kernel_names,
    merge_into,
    new_accumulators,
)
from megatron_tasp.kernels._calls import BoundOp, call_aten, call_python, named_returns
from megatron_tasp.kernels.base import expand_kv, sum_kv_groups
from megatron_tasp.kernels.cpu import CpuFlashAttention
from megatron_tasp.kernels.experimental import flash_attn_pkg as fa_mod  # the opt-in: registers both
from megatron_tasp.kernels.experimental import te as te_mod
from megatron_tasp.kernels.math_ref import MathAttention
from megatron_tasp.kernels.sdpa import (
    CudnnAttention,
    EfficientAttention,
    FlashSdpaAttention,
    SdpaCtx,
    _format_lse,
    _normalise_lse,
)
from megatron_tasp.options import default_options, reload_env

TOL = {
    torch.float32: {"out": 1e-5, "lse": 1e-5, "grad": 1e-5},
    torch.bfloat16: {"out": 1e-2, "lse": 1e-3, "grad": 3e-2},
}
HEADS = [(4, 4), (4, 2), (4, 1)]  # (h, h_kv): MHA, GQA, MQA
CPU_BACKENDS = ["cpu", "math"]


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """max|a - ref| / max(max|ref|, floor)."""
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(floor))


def abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max())


def make_qkv(b, h, h_kv, sq, sk, d, dtype, *, sbhd=True, seed=0):
    """q [b,h,sq,d], k/v [b,h_kv,sk,d]; by default non-contiguous views of [s,b,h,d] memory (Megatron)."""
    g = torch.Generator().manual_seed(seed)

    def mk(s, hh):
        if sbhd:
            return torch.randn(s, b, hh, d, generator=g).to(dtype).permute(1, 2, 0, 3)
        return torch.randn(b, hh, s, d, generator=g).to(dtype)

    q, k, v = mk(sq, h), mk(sk, h_kv), mk(sk, h_kv)
    dout = torch.randn(b, h, sq, d, generator=g).to(dtype)
    return q, k, v, dout


def reference(q, k, v, dout, *, causal, scale):
    """float64 out, lse, dq, dk, dv (autograd through an explicit softmax with K/V expanded)."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    ke, ve = k64.repeat_interleave(g, 1), v64.repeat_interleave(g, 1)
    s = q64 @ ke.transpose(-1, -2) * scale
    if causal:
        mask = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ ve
    out.backward(dout.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def check(name, got, ref, tol, kind="rel", floor=1e-30):
    err = rel_err(got, ref, floor) if kind == "rel" else abs_err(got, ref)
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------------------------------
# single block: out / lse / dq / dk / dv against float64
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
def test_single_block(backend, dtype, causal, heads):
    h, h_kv = heads
    sq, sk = (45, 45) if causal else (37, 53)  # odd lengths; sq != sk when not causal
    d = 16
    scale = d**-0.5
    q, k, v, dout = make_qkv(2, h, h_kv, sq, sk, d, dtype)
    kern = get_kernel(backend, "cpu", dtype, d)
    assert isinstance(kern, BlockAttention) and kern.name == backend
    out, lse, ctx = kern.forward(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, h, sq) and lse.dtype == torch.float32 and lse.is_contiguous()
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, dout, causal=causal, scale=scale)
    tol = TOL[dtype]
    check("out", out, r_out, tol["out"])
    check("lse", lse, r_lse, tol["lse"], kind="abs")
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, ctx, causal=causal, scale=scale)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    check("dq", dq, r_dq, tol["grad"])
    check("dk", dk, r_dk, tol["grad"])
    check("dv", dv, r_dv, tol["grad"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_contiguous_inputs_and_fp32_merged_out(backend):
    """Plain contiguous [b,h,s,d] inputs, and a float32 merged out / dout of another layout in backward."""
    q, k, v, dout = make_qkv(1, 4, 2, 33, 33, 8, torch.float32, sbhd=False, seed=3)
    kern = get_kernel(backend, "cpu", torch.float32, 8)
    out, lse, ctx = kern.forward(q, k, v, causal=True, scale=0.3)
    r = reference(q, k, v, dout, causal=True, scale=0.3)
    check("out", out, r[0], 1e-5)
    out_t = out.float().transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    dq, dk, dv = kern.backward(dout.transpose(1, 2).contiguous().transpose(1, 2), q, k, v, out_t, lse, ctx,
                               causal=True, scale=0.3)  # fmt: skip
    for nm, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), r[2:]):
        check(nm, got, ref, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_last_dim_inputs(backend):
    """Regression: the CPU flash op silently returns wrong results when the head dim is strided."""
    q, k, v, dout = make_qkv(2, 4, 2, 29, 29, 8, torch.float32, seed=4)
    d_major = lambda x: x.transpose(2, 3).contiguous().transpose(2, 3)
    kern = get_kernel(backend, "cpu", torch.float32, 8)
    qs, ks, vs = d_major(q), d_major(k), d_major(v)
    assert qs.stride(-1) != 1
    out, lse, ctx = kern.forward(qs, ks, vs, causal=True, scale=0.3)
    r = reference(q, k, v, dout, causal=True, scale=0.3)
    check("out", out, r[0], 1e-5)
    check("lse", lse, r[1], 1e-5, kind="abs")
    grads = kern.backward(d_major(dout), qs, ks, vs, d_major(out), lse, ctx, causal=True, scale=0.3)
    for nm, got, ref in zip(("dq", "dk", "dv"), grads, r[2:]):
        check(nm, got, ref, 1e-5)


def test_math_float64_is_an_exact_oracle():
    q, k, v, dout = make_qkv(1, 4, 2, 20, 31, 8, torch.float64, seed=5)
    kern = get_kernel("math", "cpu", torch.float64, 8)
    out, lse, ctx = kern.forward(q, k, v, causal=False, scale=0.5)
    assert lse.dtype == torch.float64
    r = reference(q, k, v, dout, causal=False, scale=0.5)
    grads = kern.backward(dout, q, k, v, out, lse, ctx, causal=False, scale=0.5)
    for got, ref in zip((out, lse, *grads), (r[0], r[1], *r[2:])):
        assert rel_err(got, ref) < 1e-12


# ------------------------------------------------------------------------------------------------------------
# blocks + merge == full attention (forward), per-block backward with the MERGED out/lse == full grads
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("splits", [(20, 33), (20, 1, 32)], ids=["2blocks", "3blocks"])
def test_merge_kv_blocks_noncausal(backend, dtype, heads, splits):
    h, h_kv = heads
    sq, sk, d, scale = 37, sum(splits), 16, 0.25
    q, k, v, dout = make_qkv(2, h, h_kv, sq, sk, d, dtype, seed=1)
    kern = get_kernel(backend, "cpu", dtype, d)
    out_acc, lse_acc = new_accumulators(q.shape, q.device)
    blocks, ctxs, start = [], [], 0
    for n in splits:
        kb, vb = k[:, :, start : start + n], v[:, :, start : start + n]
        o, l_, c = kern.forward(q, kb, vb, causal=False, scale=scale)
        merge_into(out_acc, lse_acc, o, l_)
        blocks.append((kb, vb))
        ctxs.append(c)
        start += n
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, dout, causal=False, scale=scale)
    tol = TOL[dtype]
    check("merged out", out_acc, r_out, tol["out"])
    check("merged lse", lse_acc, r_lse, tol["lse"], kind="abs")
    out_m = out_acc.to(dtype)  # what a ring passes back: the merged output in the input dtype
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dks, dvs = [], []
    for (kb, vb), c in zip(blocks, ctxs):
        dqb, dkb, dvb = kern.backward(dout, q, kb, vb, out_m, lse_acc, c, causal=False, scale=scale)
        dq += dqb.float()
        dks.append(dkb)
        dvs.append(dvb)
    check("dq", dq, r_dq, tol["grad"])
    check("dk", torch.cat(dks, 2), r_dk, tol["grad"])
    check("dv", torch.cat(dvs, 2), r_dv, tol["grad"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
def test_merge_causal_front_back(backend, dtype, heads):
    """Causal attention over [front; back] as 3 blocks, merged into SLICES of the accumulators:
    Qf x Kf (causal), Qb x Kb (causal), Qb x Kf (full); the back half merges out of order."""
    h, h_kv = heads
    m, d, scale = 23, 16, 0.25
    q, k, v, dout = make_qkv(2, h, h_kv, 2 * m, 2 * m, d, dtype, seed=2)
    f, bk = slice(0, m), slice(m, 2 * m)
    kern = get_kernel(backend, "cpu", dtype, d)
    out_acc, lse_acc = new_accumulators(q)
    plan = [(f, f, True), (bk, bk, True), (bk, f, False)]  # (query rows, key rows, causal)
    ctxs = []
    for qr, kr, causal in plan:
        o, l_, c = kern.forward(q[:, :, qr], k[:, :, kr], v[:, :, kr], causal=causal, scale=scale)
        merge_into(out_acc[:, :, qr], lse_acc[:, :, qr], o, l_)
        ctxs.append(c)
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, dout, causal=True, scale=scale)
    tol = TOL[dtype]
    check("merged out", out_acc, r_out, tol["out"])
    check("merged lse", lse_acc, r_lse, tol["lse"], kind="abs")
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    for (qr, kr, causal), c in zip(plan, ctxs):
        dqb, dkb, dvb = kern.backward(dout[:, :, qr], q[:, :, qr], k[:, :, kr], v[:, :, kr], out_acc[:, :, qr],
                                      lse_acc[:, :, qr], c, causal=causal, scale=scale)  # fmt: skip
        dq[:, :, qr] += dqb.float()
        dk[:, :, kr] += dkb.float()
        dv[:, :, kr] += dvb.float()
    check("dq", dq, r_dq, tol["grad"])
    check("dk", dk, r_dk, tol["grad"])
    check("dv", dv, r_dv, tol["grad"])


@settings(max_examples=30, deadline=None)
@given(
    backend=st.sampled_from(CPU_BACKENDS),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    sq=st.integers(1, 9),
    heads=st.sampled_from(HEADS),
    seed=st.integers(0, 2**16),
)
def test_merge_any_partition_any_order(backend, sizes, sq, heads, seed):
    """Property: any partition of the keys into blocks, merged in any order, gives full attention, and the
    per-block backward with the merged out/lse sums to the full gradients (float32)."""
    h, h_kv = heads
    q, k, v, dout = make_qkv(1, h, h_kv, sq, sum(sizes), 8, torch.float32, seed=seed)
    kern = get_kernel(backend, "cpu", torch.float32, 8)
    bounds = list(itertools.accumulate([0, *sizes]))
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
    out_acc, lse_acc = new_accumulators(q)
    ctxs = {}
    for i in order:
        kb, vb = k[:, :, bounds[i] : bounds[i + 1]], v[:, :, bounds[i] : bounds[i + 1]]
        o, l_, ctxs[i] = kern.forward(q, kb, vb, causal=False, scale=0.35)
        merge_into(out_acc, lse_acc, o, l_)
    r = reference(q, k, v, dout, causal=False, scale=0.35)
    check("out", out_acc, r[0], 1e-5)
    check("lse", lse_acc, r[1], 1e-5, kind="abs")
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    for i in range(len(sizes)):
        sl = slice(bounds[i], bounds[i + 1])
        gq, gk, gv = kern.backward(dout, q, k[:, :, sl], v[:, :, sl], out_acc, lse_acc, ctxs[i], causal=False,
                                   scale=0.35)  # fmt: skip
        dq += gq
        dk[:, :, sl] = gk
        dv[:, :, sl] = gv
    for nm, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), r[2:]):
        # floor: with a single key dq = dk = 0 exactly, and the kernels return rounding noise (~1e-7)
        check(nm, got, ref, 1e-5, floor=0.1)


# ------------------------------------------------------------------------------------------------------------
# merge_into / new_accumulators
# ------------------------------------------------------------------------------------------------------------
def test_merge_into_fresh_accumulators_is_exact():
    g = torch.Generator().manual_seed(0)
    out_blk = torch.randn(2, 3, 5, 4, generator=g).bfloat16()
    lse_blk = torch.randn(2, 3, 5, generator=g) * 10
    out_acc, lse_acc = new_accumulators((2, 3, 5, 4), "cpu")
    assert out_acc.dtype == lse_acc.dtype == torch.float32
    assert torch.isneginf(lse_acc).all() and (out_acc == 0).all()
    merge_into(out_acc, lse_acc, out_blk, lse_blk)
    assert torch.equal(out_acc, out_blk.float())
    assert torch.equal(lse_acc, lse_blk)


def test_merge_into_neg_inf_rows_give_no_nan():
    out_acc, lse_acc = new_accumulators((1, 2, 4, 3))
    out_blk = torch.ones(1, 2, 4, 3)
    lse_blk = torch.tensor([[[float("-inf"), 0.0, float("-inf"), 1.0]] * 2])
    merge_into(out_acc, lse_acc, out_blk, lse_blk)
    assert not torch.isnan(out_acc).any() and not torch.isnan(lse_acc).any()
    assert torch.isneginf(lse_acc[:, :, 0]).all() and (out_acc[:, :, 0] == 0).all()
    assert torch.equal(out_acc[:, :, 1], out_blk[:, :, 1])
    # a second all -inf block changes nothing
    before = out_acc.clone(), lse_acc.clone()
    merge_into(out_acc, lse_acc, torch.full_like(out_blk, 7.0), torch.full_like(lse_blk, float("-inf")))
    assert torch.equal(out_acc, before[0]) and torch.equal(lse_acc, before[1])


def test_merge_into_is_order_independent():
    g = torch.Generator().manual_seed(1)
    blocks = []
    for i in range(4):
        lse = torch.randn(2, 3, 6, generator=g) * 5
        if i == 2:
            lse[:, :, 0] = float("-inf")  # a block that some rows do not see
        blocks.append((torch.randn(2, 3, 6, 8, generator=g), lse))
    results = []
    for perm in itertools.permutations(range(4)):
        out_acc, lse_acc = new_accumulators((2, 3, 6, 8))
        for i in perm:
            merge_into(out_acc, lse_acc, *blocks[i])
        results.append((out_acc, lse_acc))
    # exact answer in float64
    lse_all = torch.logsumexp(torch.stack([b[1].double() for b in blocks]), 0)
    out_all = sum(b[0].double() * torch.exp(b[1].double() - lse_all).unsqueeze(-1) for b in blocks)
    for out_acc, lse_acc in results:
        assert rel_err(out_acc, out_all) < 1e-6
        assert abs_err(lse_acc, lse_all) < 1e-5


def test_merge_into_slice_views_only_touch_their_rows():
    out_acc, lse_acc = new_accumulators((1, 2, 10, 4))
    out_blk, lse_blk = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4)
    merge_into(out_acc[:, :, 6:], lse_acc[:, :, 6:], out_blk, lse_blk)
    assert torch.equal(out_acc[:, :, 6:], out_blk) and torch.equal(lse_acc[:, :, 6:], lse_blk)
    assert (out_acc[:, :, :6] == 0).all() and torch.isneginf(lse_acc[:, :, :6]).all()


def test_merge_into_and_new_accumulators_validate():
    out_acc, lse_acc = new_accumulators(torch.empty(1, 2, 5, 4, dtype=torch.bfloat16))
    assert out_acc.shape == (1, 2, 5, 4) and lse_acc.shape == (1, 2, 5) and out_acc.dtype == torch.float32
    with pytest.raises(ValueError, match="does not match"):
        merge_into(out_acc, lse_acc, torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="b, h, s, d"):
        new_accumulators((2, 3, 4))


# ------------------------------------------------------------------------------------------------------------
# error cases
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_blocks_raise_before_any_kernel(backend):
    kern = get_kernel(backend, "cpu", torch.float32, 8)
    q, k, v, dout = make_qkv(1, 2, 2, 4, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="empty attention block"):
        kern.forward(q[:, :, :0], k, v, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="empty attention block"):
        kern.forward(q, k[:, :, :0], v[:, :, :0], causal=False, scale=1.0)
    out, lse, ctx = kern.forward(q, k, v, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="empty attention block"):
        kern.backward(dout[:, :, :0], q[:, :, :0], k, v, out[:, :, :0], lse[:, :, :0], ctx, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="empty attention block"):
        kern.backward(dout, q, k[:, :, :0], v[:, :, :0], out, lse, ctx, causal=False, scale=1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_raise_value_error(backend):
    kern = get_kernel(backend, "cpu", torch.float32, 8)
    q, k, v, dout = make_qkv(1, 4, 2, 5, 7, 8, torch.float32)
    with pytest.raises(ValueError, match="sq == sk"):
        kern.forward(q, k, v, causal=True, scale=1.0)
    q3, k3, v3, _ = make_qkv(1, 4, 3, 5, 5, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        kern.forward(q3, k3, v3, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="same shape"):
        kern.forward(q, k, v[:, :, :3], causal=False, scale=1.0)
    with pytest.raises(ValueError, match="dtype"):
        kern.forward(q, k.double(), v.double(), causal=False, scale=1.0)
    with pytest.raises(ValueError, match="4-D"):
        kern.forward(q[0], k, v, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="head_dim"):
        kern.forward(q[..., :4], k, v, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        kern.forward(q, k, v, causal=False, scale=float("nan"))
    out, lse, ctx = kern.forward(q, k, v, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="lse must be"):
        kern.backward(dout, q, k, v, out, lse[:, :, :3], ctx, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="dout must be"):
        kern.backward(dout[:, :2], q, k, v, out, lse, ctx, causal=False, scale=1.0)


def test_unknown_backend_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown attention kernel") as exc:
        get_kernel("nope", "cpu", torch.float32, 64)
    for nm in ("auto", "cpu", "math", "cudnn", "flash", "efficient", "flash_attn", "te"):
        assert nm in str(exc.value)


@pytest.mark.parametrize("name", ["cudnn", "flash", "efficient", "flash_attn", "te"])
def test_unavailable_backend_fails_closed(name):
    with pytest.raises(RuntimeError, match="cannot run") as exc:
        get_kernel(name, "cpu", torch.float32, 64)
    msg = str(exc.value)
    assert "CUDA" in msg and "Available here: cpu, math" in msg


def test_cpu_backend_rejects_other_devices():
    assert not CpuFlashAttention.is_available("cuda", torch.float32, 8)
    with pytest.raises(RuntimeError, match="only runs on CPU"):
        get_kernel("cpu", "meta", torch.float32, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        get_kernel("cpu", "cpu", torch.int32, 8)


# ------------------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------------------
ENV_VAR = "MEGATRON_TASP_KERNEL"


def _env_kernel(monkeypatch, value):
    """Set the kernel's environment default and make the engine see it (read once per process)."""
    monkeypatch.setenv(ENV_VAR, value)
    reload_env()
    clear_plan_cache()


def test_auto_selection_and_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_kernel(None, "cpu", torch.float32, 64).name == "cpu"
    assert get_kernel("auto", "cpu", torch.bfloat16, 64).name == "cpu"
    assert get_kernel(None, "meta", torch.float32, 64).name == "math"
    assert auto_order("cpu") == ("cpu", "math")
    assert set(kernel_names()) == {"cpu", "math", "cudnn", "flash", "efficient", "flash_attn", "te"}
    assert available_kernels("cpu", torch.float32, 64) == ["cpu", "math"]
    q = torch.randn(8, 1, 2, 64)
    try:
        _env_kernel(monkeypatch, "math")  # the environment sets the default options' kernel, not get_kernel's
        assert get_kernel(None, "cpu", torch.float32, 64).name == "cpu"
        assert default_options().kernel == "math"
        assert tasp_run_summary(q, q, q, None)["kernel"] == "math"
        assert tasp_run_summary(q, q, q, None, kernel="cpu")["kernel"] == "cpu"  # an explicit name wins
        _env_kernel(monkeypatch, "auto")
        assert tasp_run_summary(q, q, q, None)["kernel"] == "cpu"
        _env_kernel(monkeypatch, "bogus")
        with pytest.raises(ValueError, match=ENV_VAR):
            tasp_attention(q, q, q, None)
        _env_kernel(monkeypatch, "cudnn")
        with pytest.raises(RuntimeError, match="cannot run"):
            tasp_attention(q, q, q, None)
    finally:
        monkeypatch.delenv(ENV_VAR, raising=False)
        reload_env()
        clear_plan_cache()


def test_experimental_kernels_need_the_explicit_import():
    """flash_attn and te register only with 'import megatron_tasp.kernels.experimental' (a fresh process
    here, since this module imports them); naming one without it fails with the fix."""
    code = ("import torch\nfrom megatron_tasp.kernels import get_kernel, kernel_names\n"
            "assert not {'te', 'flash_attn'} & set(kernel_names())\n"
            "try:\n    get_kernel('te', 'cpu', torch.float32, 64)\nexcept ValueError as exc:\n    print(exc)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "experimental" in res.stdout and "import megatron_tasp.kernels.experimental" in res.stdout, res.stdout
    assert set(EXPERIMENTAL_KERNELS) <= set(kernel_names())  # registered here by the import at the top


# ------------------------------------------------------------------------------------------------------------
# CUDA backends: argument plumbing against this torch build's op schemas, on meta tensors
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CudnnAttention, FlashSdpaAttention, EfficientAttention], ids=lambda c: c.name)
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_backends_bind_op_schemas_on_meta(cls, heads, causal):
    """The meta kernels of the SDPA ops mirror the CUDA ones' outputs (cuDNN lse (b,h,s,1), efficient lse
    padded to 32): checks names, argument binding, lse normalisation, GQA expansion and group sums."""
    h, h_kv = heads
    sq, sk = (100, 100) if causal else (100, 70)
    q = torch.empty(100, 2, h, 64, device="meta", dtype=torch.bfloat16).permute(1, 2, 0, 3)
    k = torch.empty(2, h_kv, sk, 64, device="meta", dtype=torch.bfloat16)
    kern = cls()
    out, lse, ctx = kern.forward(q, k, k, causal=causal, scale=0.125)
    assert out.shape == (2, h, sq, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (2, h, sq) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert isinstance(ctx, SdpaCtx)
    dout = torch.empty(2, h, sq, 64, device="meta", dtype=torch.bfloat16)
    out32 = torch.empty(2, h, sq, 64, device="meta")  # a float32 merged output
    dq, dk, dv = kern.backward(dout, q, k, k, out32, lse, ctx, causal=causal, scale=0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="SdpaCtx"):
        kern.backward(dq, q, k, k, out, lse, None, causal=causal, scale=0.125)


def test_lse_normalise_and_format_roundtrip():
    raw_pad = torch.randn(2, 3, 64)  # efficient: padded to a multiple of 32
    lse = _normalise_lse(raw_pad, 2, 3, 50, "op")
    assert lse.shape == (2, 3, 50) and torch.equal(lse, raw_pad[..., :50])
    back = _format_lse(lse, (tuple(raw_pad.shape), raw_pad.stride()))
    assert back.shape == (2, 3, 64) and torch.equal(back[..., :50], lse) and (back[..., 50:] == 0).all()
    raw4 = torch.randn(2, 5, 3, 1).permute(0, 2, 1, 3)  # cuDNN-like (b,h,s,1), strided like [b,s,h]
    lse4 = _normalise_lse(raw4, 2, 3, 5, "op")
    back4 = _format_lse(lse4, (tuple(raw4.shape), raw4.stride()))
    assert back4.shape == raw4.shape and back4.stride() == raw4.stride() and torch.equal(back4, raw4)
    with pytest.raises(RuntimeError, match="unexpected shape"):
        _normalise_lse(torch.randn(2, 5, 3), 2, 3, 5, "op")


def test_expand_and_group_sum_are_adjoint():
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    y = expand_kv(x, 4)
    assert y.shape == (2, 12, 5, 4) and torch.equal(y[:, 4:8], x[:, 1:2].expand(2, 4, 5, 4))
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.allclose(sum_kv_groups(gy, 3, torch.float32), x.grad, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# schema / signature binding helpers
# ------------------------------------------------------------------------------------------------------------
def test_call_aten_binds_by_name_and_reports_schema():
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    q = torch.randn(1, 2, 3, 4)
    res = call_aten(op, {"query": q, "key": q, "value": q, "is_causal": True, "scale": 0.5})
    r = named_returns(op, res, ("output", "logsumexp"))
    assert set(r) >= {"output", "logsumexp"}
    with pytest.raises(RuntimeError, match="required argument 'value'"):
        call_aten(op, {"query": q, "key": q})
    with pytest.raises(RuntimeError, match="no argument"):
        call_aten(op, {"query": q, "key": q, "value": q, "bogus": 1})
    call_aten(op, {"query": q, "key": q, "value": q, "bogus": 1}, ignorable=("bogus",))


def test_bound_op_matches_call_aten_positional_up_to_the_first_skip():
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    q = torch.randn(1, 2, 3, 4)
    vals = {"query": q, "key": q, "value": q, "is_causal": True, "scale": 0.5}
    bound = BoundOp(op, vals)
    got, ref = bound(vals), call_aten(op, vals)
    assert torch.equal(got[bound.index["output"]], ref[0]) and torch.equal(got[bound.index["logsumexp"]], ref[1])
    seen = {}

    def record(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
    BoundOp(op, vals, fast=record)(vals)
    # dropout_p is left to its default, so is_causal after it must be named; scale is keyword-only
    assert len(seen["args"]) == 3 and set(seen["kwargs"]) == {"is_causal", "scale"}
    with pytest.raises(RuntimeError, match="required argument 'value'"):
        BoundOp(op, {"query": q, "key": q})


def test_sdpa_plumbing_on_the_cpu_op():
    """The CUDA SDPA backends' shared forward/backward plumbing (bound ops, lse layouts, GQA), run over
    the CPU flash op so that it is checked without a GPU."""
    from megatron_tasp.kernels.sdpa import _SdpaBackend

    class CpuViaSdpa(_SdpaBackend):
        name = "cpu-via-sdpa"
        fwd_op = "_scaled_dot_product_flash_attention_for_cpu"
        bwd_op = "_scaled_dot_product_flash_attention_for_cpu_backward"
        native_gqa = True
        fwd_fallback = ("output", "logsumexp")

        @classmethod
        def unavailable_reason(cls, device, dtype, head_dim):
            return None

        def _fwd_values(self, q, k, v, causal, scale):
            return {"query": q, "key": k, "value": v, "dropout_p": 0.0, "is_causal": causal, "scale": scale}

        def _bwd_values(self, ctx, causal, scale):
            return {"dropout_p": 0.0, "is_causal": causal, "scale": scale}

    kern, ref = CpuViaSdpa(), get_kernel("cpu", "cpu", torch.float32, 8)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 6, 8, generator=gen)
    k, v = (torch.randn(2, 2, 6, 8, generator=gen) for _ in range(2))
    do = torch.randn(2, 4, 6, 8, generator=gen)
    for causal in (True, False):
        o1, l1, c1 = kern.forward(q, k, v, causal=causal, scale=0.3)
        o2, l2, c2 = ref.forward(q, k, v, causal=causal, scale=0.3)
        assert torch.allclose(o1, o2) and torch.allclose(l1, l2) and l1.dtype == torch.float32
        g1 = kern.backward_unchecked(do, q, k, v, o1, l1, c1, causal=causal, scale=0.3)
        g2 = ref.backward(do, q, k, v, o2, l2, c2, causal=causal, scale=0.3)
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-6)


def test_call_python_binds_variants():
    def new_style(q, /, k, window_size_left, window_size_right, softcap=0.0, alibi_slopes=None):
        return (q, k, window_size_left, window_size_right, softcap, alibi_slopes)

    def old_style(q, k, window_size, cu_seqlens_q):
        return (q, k, window_size, cu_seqlens_q)

    vals = {"q": 1, "k": 2, "window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1}
    assert call_python(new_style, vals) == (1, 2, -1, -1, 0.0, None)
    assert call_python(old_style, vals, none_ok=("cu_seqlens_q",)) == (1, 2, (-1, -1), None)
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        call_python(old_style, vals)


# ------------------------------------------------------------------------------------------------------------
# flash_attn / TE wrappers against fake modules (the real packages cannot be installed here)
# ------------------------------------------------------------------------------------------------------------
_MATH = MathAttention()


def _bshd_math_fwd(q, k, v, scale, causal):
    out, lse, _ = _MATH.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale)
    return out.transpose(1, 2).contiguous(), lse


def _bshd_math_bwd(dout, q, k, v, out, lse, scale, causal):
    t = lambda x: x.transpose(1, 2)
    return [x.transpose(1, 2) for x in _MATH.backward(t(dout), t(q), t(k), t(v), t(out), lse, None,
                                                      causal=causal, scale=scale)]  # fmt: skip


def _fake_fa2(old: bool):
    mod = types.ModuleType("fake_flash_attn_interface")
    if old:  # flash-attn <= 2.5: tuple window_size, 8 return values

        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax):
            assert window_size == (-1, -1) and dropout_p == 0.0
            out, lse = _bshd_math_fwd(q, k, v, softmax_scale, causal)
            return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)

    else:

        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, return_softmax):  # fmt: skip
            out, lse = _bshd_math_fwd(q, k, v, softmax_scale, causal)
            return out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                             rng_state=None):  # fmt: skip
        assert rng_state is not None and softmax_lse.is_contiguous()
        for dst, src in zip((dq, dk, dv), _bshd_math_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal)):
            dst.copy_(src)
        return None

    mod._flash_attn_forward = _flash_attn_forward
    mod._flash_attn_backward = _flash_attn_backward
    return mod


def _fake_fa3():
    mod = types.ModuleType("fake_flash_attn_interface_v3")

    def _flash_attn_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None,
                            softmax_scale=None, causal=False, window_size_left=-1, window_size_right=-1,
                            num_splits=1, pack_gqa=None):  # fmt: skip
        out, lse = _bshd_math_fwd(q, k, v, softmax_scale, causal)
        return out, lse, torch.empty(0), torch.empty(0)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, sequed_q=None,
                             max_seqlen_q=None, dq=None, dk=None, dv=None, softmax_scale=None, is_causal=False,
                             deterministic=False):  # fmt: skip
        for dst, src in zip((dq, dk, dv), _bshd_math_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, is_causal)):
            dst.copy_(src)
        return torch.empty(0)

    mod._flash_attn_forward = _flash_attn_forward
    mod._flash_attn_backward = _flash_attn_backward
    return mod


def _roundtrip(kern, causal, heads=(4, 2), sbhd=True):
    h, h_kv = heads
    s = 21
    q, k, v, dout = make_qkv(2, h, h_kv, s, s, 8, torch.float32, sbhd=sbhd, seed=9)
    out, lse, ctx = kern._forward(q, k, v, causal=causal, scale=0.3)
    r = reference(q, k, v, dout, causal=causal, scale=0.3)
    check("out", out, r[0], 1e-5)
    check("lse", lse, r[1], 1e-5, kind="abs")
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    grads = kern._backward(dout, q, k, v, out, lse, ctx, causal=causal, scale=0.3)
    for nm, got, ref in zip(("dq", "dk", "dv"), grads, r[2:]):
        assert got.shape == ref.shape
        check(nm, got, ref, 1e-5)


@pytest.mark.parametrize("variant", ["fa2", "fa2_old", "fa3"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_wrapper_with_fake_module(monkeypatch, variant, causal):
    mod = {"fa2": lambda: _fake_fa2(False), "fa2_old": lambda: _fake_fa2(True), "fa3": _fake_fa3}[variant]()
    ver = 3 if variant == "fa3" else 2
    fake = fa_mod._FlashAttnModule(mod, ver)
    monkeypatch.setattr(fa_mod.FlashAttnPackageAttention, "_module", staticmethod(lambda dev: fake))
    _roundtrip(fa_mod.FlashAttnPackageAttention(), causal)


def _fake_te():
    mod = types.ModuleType("fake_te_fused_attn")
    mod.FusedAttnBackend = {"F16_arbitrary_seqlen": "arb", "No_Backend": "none"}

    def to_bshd(x, layout):
        return x.transpose(0, 1) if layout.startswith("sbhd") else x

    def from_bshd(x, layout):
        return (x.transpose(0, 1) if layout.startswith("sbhd") else x).contiguous()

    def fused_attn_fwd(is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, fake_dtype,
                       fused_attention_backend, attn_bias=None, attn_scale=None, dropout=0.0, fast_zero_fill=True,
                       qkv_layout="sbh3d", attn_bias_type="no_bias", attn_mask_type="padding", window_size=(-1, -1),
                       rng_gen=None):  # fmt: skip
        assert fused_attention_backend == "arb" and all(x.is_contiguous() for x in (q, k, v))
        causal = attn_mask_type == "causal"
        assert window_size == ((-1, 0) if causal else (-1, -1))
        assert cu_seqlens_q[-1] == q.numel() // (q.shape[-1] * q.shape[-2])
        out, lse = _bshd_math_fwd(*(to_bshd(x, qkv_layout) for x in (q, k, v)), attn_scale, causal)
        return from_bshd(out, qkv_layout), [lse.unsqueeze(-1), torch.zeros(2, dtype=torch.int64)]

    def fused_attn_bwd(max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, o, d_o, fake_dtype,
                       dqkv_dtype, aux_ctx_tensors, fused_attention_backend, attn_scale=None, dropout=0.0,
                       fast_zero_fill=True, qkv_layout="sbh3d", attn_bias_type="no_bias", attn_mask_type="padding",
                       window_size=(-1, -1), deterministic=False):  # fmt: skip
        assert dqkv_dtype == "TE_F32" and len(aux_ctx_tensors) == 2
        lse = aux_ctx_tensors[0].squeeze(-1)
        t = [to_bshd(x, qkv_layout) for x in (d_o, q, k, v, o)]
        grads = _bshd_math_bwd(*t, lse, attn_scale, attn_mask_type == "causal")
        return [from_bshd(g, qkv_layout) for g in grads]

    mod.fused_attn_fwd = fused_attn_fwd
    mod.fused_attn_bwd = fused_attn_bwd
    return mod


@pytest.mark.parametrize("sbhd", [True, False], ids=["sbhd", "bshd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_te_wrapper_with_fake_module(monkeypatch, sbhd, causal):
    api = te_mod._TeApi(_fake_te(), {torch.float32: "TE_F32"})
    monkeypatch.setattr(te_mod, "_load", lambda: api)
    _roundtrip(te_mod.TransformerEngineAttention(), causal, sbhd=sbhd)

