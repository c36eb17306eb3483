"""GPU tests of the block-attention kernels: every CUDA backend against a float64 reference.

Run on a CUDA machine with ``python -m pytest tests/gpu/test_kernels_gpu.py -q``; the whole module is skipped
when CUDA is not available. Inputs are non-contiguous ``[b, h, s, d]`` views of ``[s, b, h, d]`` memory, as
the TASP attention passes them. Tolerances (max|x - ref| / max|ref|; lse as max absolute error) leave ~5-10x
margin over the errors expected of fused bf16/fp16 kernels (cuDNN ring-style backward measured ~3e-3 relative
at bf16 on H100):

* bfloat16: out 3e-2, lse 1e-2, dq/dk/dv 5e-2
* float16:  out 1e-2, lse 1e-2, dq/dk/dv 2e-2
"""

from __future__ import annotations

import pytest
import torch

import megatron_tasp.kernels.experimental  # noqa: F401  (the opt-in: registers flash_attn and te)
from megatron_tasp.kernels import (
    available_kernels,
    get_kernel,
    kernel_names,
    merge_into,
    new_accumulators,
)
from tests.test_kernels import reference  # the float64 oracle; it runs on the inputs' device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BACKENDS = ["cudnn", "flash", "efficient", "math", "flash_attn", "te"]
DTYPES = [torch.bfloat16, torch.float16]
TOL = {
    torch.bfloat16: {"out": 3e-2, "lse": 1e-2, "grad": 5e-2},
    torch.float16: {"out": 1e-2, "lse": 1e-2, "grad": 2e-2},
}
# (b, h, h_kv, sq, sk, d, causal)
SHAPES = [
    (2, 8, 2, 256, 256, 64, True),
    (2, 8, 2, 256, 256, 64, False),
    (1, 8, 2, 1024, 1024, 128, True),
    (1, 8, 2, 384, 640, 128, False),
    (2, 8, 8, 512, 512, 64, True),
]


def _shape_id(s):
    b, h, hk, sq, sk, d, causal = s
    return f"b{b}h{h}kv{hk}q{sq}k{sk}d{d}{'c' if causal else 'f'}"


@pytest.fixture(autouse=True)
def _no_tf32():
    """Keep float32 matmuls exact (the math backend computes in float32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def kernel_or_skip(name, dtype, d):
    if name not in available_kernels("cuda", dtype, d):
        reason = get_kernel_reason(name, dtype, d)
        pytest.skip(f"{name} not available here: {reason}")
    return get_kernel(name, "cuda", dtype, d)


def get_kernel_reason(name, dtype, d):
    try:
        get_kernel(name, "cuda", dtype, d)
    except RuntimeError as exc:
        return str(exc)
    return "?"


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def abs_err(a, ref):
    return float((a.double() - ref.double()).abs().max())


def check(name, got, ref, tol, kind="rel"):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(got, ref) if kind == "rel" else abs_err(got, ref)
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g}"


def make_qkv(b, h, h_kv, sq, sk, d, dtype, seed=0):
    """q [b,h,sq,d], k/v [b,h_kv,sk,d] as views of [s,b,h,d] CUDA memory; dout contiguous."""
    g = torch.Generator().manual_seed(seed)

    def mk(s, hh):
        return torch.randn(s, b, hh, d, generator=g).to(device="cuda", dtype=dtype).permute(1, 2, 0, 3)

    q, k, v = mk(sq, h), mk(sk, h_kv), mk(sk, h_kv)
    dout = torch.randn(b, h, sq, d, generator=g).to(device="cuda", dtype=dtype)
    return q, k, v, dout



# ------------------------------------------------------------------------------------------------------------
def test_registry_and_auto_choice():
    assert {"cudnn", "flash", "efficient", "math"} <= set(kernel_names())
    avail = available_kernels("cuda", torch.bfloat16, 128)
    print(
        f"\ntorch {torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
        f"device {torch.cuda.get_device_name()}, cc {torch.cuda.get_device_capability()}; available: {avail}"
    )
    assert "math" in avail
    auto = get_kernel(None, "cuda", torch.bfloat16, 128).name
    expected = next(n for n in ("cudnn", "flash", "efficient", "math") if n in avail)
    if torch.cuda.get_device_capability()[0] < 9:
        expected = next(n for n in ("flash", "efficient", "math") if n in avail)
    assert auto == expected
    with pytest.raises(ValueError, match="unknown attention kernel"):
        get_kernel("nope", "cuda", torch.bfloat16, 128)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9 or torch.version.hip is not None,
    reason="Hopper-specific expectation",
)
def test_hopper_has_the_sdpa_backends():
    """On H100/H200 with torch >= 2.5 all three SDPA backends must be usable (else auto loses cuDNN)."""
    for dtype in DTYPES:
        for d in (64, 128):
            avail = available_kernels("cuda", dtype, d)
            for name in ("cudnn", "flash", "efficient", "math"):
                assert name in avail, f"{name} unavailable for {dtype}, d={d}: {get_kernel_reason(name, dtype, d)}"
    assert get_kernel(None, "cuda", torch.bfloat16, 128).name == "cudnn"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_single_block(backend, dtype, shape):
    b, h, h_kv, sq, sk, d, causal = shape
    kern = kernel_or_skip(backend, dtype, d)
    scale = d**-0.5
    q, k, v, dout = make_qkv(b, h, h_kv, sq, sk, d, dtype)
    out, lse, ctx = kern.forward(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32 and lse.is_contiguous()
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, dout, causal=causal, scale=scale)
    tol = TOL[dtype]
    check("out", out, r_out, tol["out"])
    check("lse", lse, r_lse, tol["lse"], kind="abs")
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, ctx, causal=causal, scale=scale)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    check("dq", dq, r_dq, tol["grad"])
    check("dk", dk, r_dk, tol["grad"])
    check("dv", dv, r_dv, tol["grad"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_merge_kv_blocks_noncausal(backend, dtype, d):
    """3 KV blocks of unequal sizes, merged; per-block backward with the merged out (input dtype) and lse."""
    kern = kernel_or_skip(backend, dtype, d)
    b, h, h_kv, sq, splits = 2, 8, 2, 320, (256, 136, 248)
    sk, scale = sum(splits), d**-0.5
    q, k, v, dout = make_qkv(b, h, h_kv, sq, sk, d, dtype, seed=1)
    out_acc, lse_acc = new_accumulators(q)
    parts, start = [], 0
    for n in splits:
        kb, vb = k[:, :, start : start + n], v[:, :, start : start + n]
        o, l_, c = kern.forward(q, kb, vb, causal=False, scale=scale)
        merge_into(out_acc, lse_acc, o, l_)
        parts.append((kb, vb, c))
        start += n
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, dout, causal=False, scale=scale)
    tol = TOL[dtype]
    check("merged out", out_acc, r_out, tol["out"])
    check("merged lse", lse_acc, r_lse, tol["lse"], kind="abs")
    out_m = out_acc.to(dtype)
    dq = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    dks, dvs = [], []
    for kb, vb, c in parts:
        dqb, dkb, dvb = kern.backward(dout, q, kb, vb, out_m, lse_acc, c, causal=False, scale=scale)
        dq += dqb.float()
        dks.append(dkb)
        dvs.append(dvb)
    check("dq", dq, r_dq, tol["grad"])
    check("dk", torch.cat(dks, 2), r_dk, tol["grad"])
    check("dv", torch.cat(dvs, 2), r_dv, tol["grad"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads", [(8, 2), (8, 8)], ids=["gqa", "mha"])
def test_merge_causal_front_back(backend, dtype, heads):
    """Causal attention over [front; back] as Qf x Kf (causal), Qb x Kb (causal), Qb x Kf (full), merged into
    slices of the accumulators; backward fed the float32 merged out and lse slices."""
    h, h_kv = heads
    b, m, d = 2, 256, 128
    kern = kernel_or_skip(backend, dtype, d)
    scale = d**-0.5
    q, k, v, dout = make_qkv(b, h, h_kv, 2 * m, 2 * m, d, dtype, seed=2)
    f, bk = slice(0, m), slice(m, 2 * m)
    out_acc, lse_acc = new_accumulators(q)
    plan = [(f, f, True), (bk, bk, True), (bk, f, False)]
    ctxs = []
    for qr, kr, causal in plan:
        o, l_, c = kern.forward(q[:, :, qr], k[:, :, kr], v[:, :, kr], causal=causal, scale=scale)
        merge_into(out_acc[:, :, qr], lse_acc[:, :, qr], o, l_)
        ctxs.append(c)
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, dout, causal=True, scale=scale)
    tol = TOL[dtype]
    check("merged out", out_acc, r_out, tol["out"])
    check("merged lse", lse_acc, r_lse, tol["lse"], kind="abs")
    dq = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    dk = torch.zeros(k.shape, dtype=torch.float32, device="cuda")
    dv = torch.zeros(v.shape, dtype=torch.float32, device="cuda")
    for (qr, kr, causal), c in zip(plan, ctxs):
        dqb, dkb, dvb = kern.backward(
            dout[:, :, qr], q[:, :, qr], k[:, :, kr], v[:, :, kr], out_acc[:, :, qr], lse_acc[:, :, qr], c,
            causal=causal, scale=scale,
        )  # fmt: skip
        dq[:, :, qr] += dqb.float()
        dk[:, :, kr] += dkb.float()
        dv[:, :, kr] += dvb.float()
    check("dq", dq, r_dq, tol["grad"])
    check("dk", dk, r_dk, tol["grad"])
    check("dv", dv, r_dv, tol["grad"])


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "math"])
def test_empty_block_raises_on_cuda(backend):
    kern = kernel_or_skip(backend, torch.bfloat16, 64)
    q, k, v, _ = make_qkv(1, 8, 2, 64, 64, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="empty attention block"):
        kern.forward(q, k[:, :, :0], v[:, :, :0], causal=False, scale=0.125)
    with pytest.raises(ValueError, match="sq == sk"):
        kern.forward(q, k[:, :, :32], v[:, :, :32], causal=True, scale=0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_fused_merge_triton_matches_torch_path(dtype, d):
    """The Triton merge (one kernel) against the torch path on strided row-slices, in place and not."""
    from megatron_tasp.kernels.fused_merge import _torch_merge, fused_merge_available, merge_to

    if not fused_merge_available("cuda"):
        pytest.skip("Triton is not usable here")
    g = torch.Generator(device="cuda").manual_seed(d)
    mem_a = torch.randn(300, 2, 4, d, device="cuda", generator=g).to(dtype)  # [s, b, h, d]
    b = torch.randn(2, 4, 150, d, device="cuda", generator=g).to(torch.bfloat16)
    la = torch.randn(2, 4, 300, device="cuda", generator=g) * 3
    lb = torch.randn(2, 4, 150, device="cuda", generator=g) * 3
    lb[:, :, :7] = float("-inf")
    a = mem_a.permute(1, 2, 0, 3)[:, :, 150:]
    ref_o, ref_l = torch.empty_like(a), torch.empty_like(la[:, :, 150:])
    _torch_merge(a, la[:, :, 150:], b, lb, ref_o, ref_l)
    out = torch.empty(2, 4, 150, d, device="cuda", dtype=torch.bfloat16)
    lo = torch.empty(2, 4, 150, device="cuda")
    merge_to(a, la[:, :, 150:], b, lb, out, lo)
    assert (out.float() - ref_o.to(torch.bfloat16).float()).abs().max() <= 2 ** -7 * ref_o.abs().max()
    assert (lo - ref_l).abs().max() <= 1e-5
    merge_to(a, la[:, :, 150:], b, lb, a, la[:, :, 150:])  # in place
    assert (a.float() - ref_o.float()).abs().max() <= (1e-6 if dtype == torch.float32 else 2 ** -7) * ref_o.abs().max()
    assert (la[:, :, 150:] - ref_l).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fill_rows_triton_equals_index_fill(dtype):
    """The row fill of the varlen blocks (Triton) writes exactly what index_fill_ writes: contiguous rows, the
    strided halves of a [rows, 2, h, d] buffer, unsorted indices, rows wider than one program's block."""
    from megatron_tasp.kernels.rowfill import fill_rows_

    dev = torch.device("cuda")
    rows = torch.tensor([7, 0, 3, 12, 5], device=dev)
    pair = torch.randn(13, 2, 8, 128, device=dev).to(dtype)
    other = pair[:, 1].clone()
    for x in (torch.randn(13, 32, 128, device=dev).to(dtype), pair[:, 0], torch.randn(13, 3, device=dev)):
        want = x.clone().index_fill_(0, rows, -2.5)
        fill_rows_(x, rows, -2.5)
        assert torch.equal(x, want)
    assert torch.equal(pair[:, 1], other), "the other half of the buffer is left alone"


@pytest.mark.parametrize("in_place", [False, True])
def test_merge_triton_reads_no_row_without_keys(in_place):
    """The Triton merge leaves a's rows where b's lse is -inf (b_out NaN there, as a block leaves them unset),
    also where a's is -inf too (padding: lse stays -inf, no NaN), and equals the torch merge elsewhere, in place
    (rows not touched) and into another tensor."""
    from megatron_tasp.kernels.fused_merge import merge_to

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    a, b = (torch.randn(1, 8, 300, 128, device=dev, generator=g).to(torch.bfloat16) for _ in range(2))
    la, lb = (torch.randn(1, 8, 300, device=dev, generator=g) * 3 for _ in range(2))
    lb[:, :, 40:170] = float("-inf")
    b[:, :, 40:170] = float("nan")
    la[:, :, 60:90] = float("-inf")  # rows no block has keys for
    ref, ref_l = torch.empty_like(a), torch.empty_like(la)
    merge_to(a, la, b, lb, ref, ref_l, fused=False)
    dst, dl = (a.clone(), la.clone()) if in_place else (torch.empty_like(a), torch.empty_like(la))
    src, src_l = (dst, dl) if in_place else (a, la)
    merge_to(src, src_l, b, lb, dst, dl)
    assert torch.isfinite(dst.float()).all() and torch.equal(dst[:, :, 40:170], a[:, :, 40:170])
    assert (dst.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert torch.equal(dl.isinf(), ref_l.isinf()) and bool((dl[:, :, 60:90] == float("-inf")).all())
    assert (dl - ref_l)[torch.isfinite(ref_l)].abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_halves_triton_equals_torch_add(dtype):
    """The hop home's add (Triton): bit-equal to torch.add of each half, rows wider than one program's block."""
    from megatron_tasp.kernels.pairadd import add_halves

    dev = torch.device("cuda")
    pair = torch.randn(37, 2, 9, 128, device=dev).to(dtype)
    a0, a1 = (torch.randn(37, 9, 128, device=dev).to(dtype) for _ in range(2))
    o0, o1 = add_halves(a0, a1, pair)
    assert o0.is_contiguous() and o1.is_contiguous()
    assert torch.equal(o0, torch.add(a0, pair[:, 0])) and torch.equal(o1, torch.add(a1, pair[:, 1]))
