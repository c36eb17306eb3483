"""merge_to: the one-kernel log-sum-exp merge (torch path here; the Triton path in tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from megatron_tasp.kernels import merge_into
from megatron_tasp.kernels.fused_merge import merge_to


def _parts(seed: int, dtype: torch.dtype, s: int = 37, d: int = 24):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(2, 3, s, d, generator=g).to(dtype) for _ in range(2))
    la, lb = (torch.randn(2, 3, s, generator=g) * 4 for _ in range(2))
    lb[0, 0, :5] = float("-inf")  # rows the block does not see
    return a, la, b, lb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_to_matches_reference_merge(dtype):
    a, la, b, lb = _parts(0, dtype)
    ref_out, ref_lse = a.float().clone(), la.clone()
    merge_into(ref_out, ref_lse, b, lb)
    dst, dlse = torch.empty_like(a), torch.empty_like(la)
    merge_to(a, la, b, lb, dst, dlse)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert (dst.float() - ref_out).abs().max() <= tol * ref_out.abs().max()
    assert (dlse - ref_lse).abs().max() <= 1e-5
    assert torch.equal(dst[0, 0, :5], a[0, 0, :5])  # weight 0 for lse = -inf: untouched rows, no NaN


def test_merge_to_in_place_on_strided_views():
    """dst aliasing a, all of them row-slices of [s, b, h, d] memory seen as [b, h, s, d]."""
    a, la, b, lb = _parts(1, torch.float32, s=40)
    mem = a.permute(2, 0, 1, 3).contiguous()  # [s, b, h, d]
    acc = mem.permute(1, 2, 0, 3)
    lacc = la.clone()
    ref_out, ref_lse = a[:, :, 20:].clone(), la[:, :, 20:].clone()
    merge_into(ref_out, ref_lse, b[:, :, 20:], lb[:, :, 20:])
    merge_to(acc[:, :, 20:], lacc[:, :, 20:], b[:, :, 20:], lb[:, :, 20:], acc[:, :, 20:], lacc[:, :, 20:])
    assert torch.allclose(acc[:, :, 20:], ref_out, atol=1e-6)
    assert torch.allclose(lacc[:, :, 20:], ref_lse, atol=1e-5)
    assert torch.equal(acc[:, :, :20], a[:, :, :20]) and torch.equal(lacc[:, :, :20], la[:, :, :20])


def test_merge_to_rejects_mismatched_shapes():
    a, la, b, lb = _parts(2, torch.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        merge_to(a, la, b[:, :, 1:], lb[:, :, 1:], a, la)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_finite_is_merge_to_in_place(dtype):
    from megatron_tasp.kernels import merge_finite_

    a, la, b, lb = _parts(3, dtype)
    la = la.to(dtype)
    ref_out, ref_lse = a.clone(), la.clone()
    merge_into(ref_out, ref_lse, b, lb)
    merge_finite_(a, la, b, lb)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert (a - ref_out).abs().max() <= tol * ref_out.abs().max() and (la - ref_lse).abs().max() <= 1e3 * tol


@pytest.mark.parametrize("in_place", [False, True])
def test_merge_to_reads_no_row_without_keys(in_place):
    """Rows where b's lse is -inf are a's exactly, whatever b_out holds there (NaN, inf: rows a block left
    unset), in place and into another tensor."""
    a, la, b, lb = _parts(2, torch.float32)
    lb[1, 2, 10:30] = float("-inf")
    gone = torch.isinf(lb)
    b[gone] = torch.tensor([float("nan"), float("inf")]).repeat(int(gone.sum()) * b.shape[-1] // 2 + 1)[
        :int(gone.sum()) * b.shape[-1]].view(-1, b.shape[-1])
    ref_out, ref_lse = a.clone(), la.clone()
    clean = torch.where(gone.unsqueeze(-1), torch.zeros_like(b), b)
    merge_into(ref_out, ref_lse, clean, lb)
    dst, dlse = (a, la) if in_place else (torch.empty_like(a), torch.empty_like(la))
    keep = a[gone].clone()
    merge_to(a, la, b, lb, dst, dlse)
    assert torch.isfinite(dst).all() and torch.equal(dst[gone], keep)
    torch.testing.assert_close(dst, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dlse, ref_lse, rtol=1e-6, atol=1e-6)


def test_torch_merge_lse_is_exact_in_float64():
    """The torch path's merged lse is log(exp(a) + exp(b)) to fp64's resolution also for large differences (a
    thresholded softplus would drop up to 2e-9 there), and a's row where b has no keys."""
    a_lse = torch.tensor([[[0.0, 3.0, -40.0, 1.0]]], dtype=torch.float64)
    b_lse = torch.tensor([[[25.0, -30.0, 0.0, float("-inf")]]], dtype=torch.float64)
    a_out, b_out = (torch.randn(1, 1, 4, 8, dtype=torch.float64) for _ in range(2))
    out, lse = torch.empty_like(a_out), torch.empty_like(a_lse)
    merge_to(a_out, a_lse, b_out, b_lse, out, lse, fused=False)
    exact = torch.logaddexp(a_lse, b_lse)
    assert (lse - exact).abs().max() <= 1e-14 and torch.equal(out[..., 3, :], a_out[..., 3, :])
