"""One-kernel log-sum-exp merge on CUDA (Triton), with the same semantics in plain torch elsewhere.

``merge_to(a_out, a_lse, b_out, b_lse, dst_out, dst_lse)`` writes the merge of two partial results,
``a`` (TASP's accumulator after step 0: finite lse, or -inf on rows no block sees, the padding of packed
documents) and ``b`` any block result::

    w = sigmoid(b_lse - a_lse)            # weight of b; 0 where b_lse = -inf
    dst_out = a_out + w * (b_out - a_out)  # computed in fp32, stored in dst_out's dtype (one rounding)
    dst_lse = a_lse + softplus(b_lse - a_lse)

``dst`` may be ``a`` itself (in-place accumulation) or another tensor, e.g. the final bf16 output when a
row is merged only once, which saves the fp32 accumulator and two copies. Rows where ``b_lse`` is -inf are
``a``'s: ``b_out`` is not read there (a block may leave the rows of queries without keys unset), and an
in-place merge does not touch them at all (at CP=2 half the rows of one rank's remote block). Shapes: out
``[b, h, s, d]`` and lse ``[b, h, s]``, any strides with a unit stride on ``d``. The torch path (CPU, or no
Triton) runs about seven element-wise kernels; the Triton path one, which matters because small shapes are bound by
the host's kernel-launch cost. ``fused=False`` (``TaspOptions.fused_merge``, environment
``MEGATRON_TASP_FUSED_MERGE=0``) forces the torch path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import lazy_triton

__all__ = ["fused_merge_available", "merge_to"]


@lazy_triton
def _kernel(triton, tl):
    """The compiled kernel and the helper its launch needs (False where Triton cannot be imported: torch path)."""

    @triton.jit
    def _merge(a, a_sb, a_sh, a_ss, la, la_sb, la_sh, la_ss,
               b, b_sb, b_sh, b_ss, lb, lb_sb, lb_sh, lb_ss,
               o, o_sb, o_sh, o_ss, lo, lo_sb, lo_sh, lo_ss,
               S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, IN_PLACE: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        bb = tl.program_id(2).to(tl.int64)
        rows = pid.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < S
        mask = rmask[:, None] & (cols[None, :] < D)
        l_a = tl.load(la + bb * la_sb + h * la_sh + rows * la_ss, mask=rmask, other=0.0).to(tl.float32)
        l_b = tl.load(lb + bb * lb_sb + h * lb_sh + rows * lb_ss, mask=rmask, other=0.0).to(tl.float32)
        live = mask & (l_b > float("-inf"))[:, None]  # rows b contributes to: b_out is read there only
        keep = live if IN_PLACE else mask  # in place, the other rows already hold their result
        diff = l_b - l_a
        # b's weight, 0 where b has no keys: also where a has none either (diff NaN there), so a's row stays
        w = tl.where(l_b > float("-inf"), 1.0 / (1.0 + tl.exp(-diff)), 0.0)
        l_new = l_a + tl.maximum(diff, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(diff)))
        x_a = tl.load(a + bb * a_sb + h * a_sh + rows[:, None] * a_ss + cols[None, :], mask=keep,
                      other=0.0).to(tl.float32)
        x_b = tl.load(b + bb * b_sb + h * b_sh + rows[:, None] * b_ss + cols[None, :], mask=live,
                      other=0.0).to(tl.float32)
        l_new = tl.where(l_b > float("-inf"), l_new, l_a)  # a row no block saw yet stays -inf (not NaN)
        res = x_a + w[:, None] * (x_b - x_a)  # w = 0 and x_b = 0 where b has no keys: exactly x_a
        tl.store(o + bb * o_sb + h * o_sh + rows[:, None] * o_ss + cols[None, :],
                 res.to(o.dtype.element_ty), mask=keep)
        tl.store(lo + bb * lo_sb + h * lo_sh + rows * lo_ss, l_new, mask=rmask)

    return _merge, triton.next_power_of_2


def fused_merge_available(device: torch.device | str) -> bool:
    """True when :func:`merge_to` runs as one Triton kernel on ``device``."""
    return torch.device(device).type == "cuda" and bool(_kernel())


def _torch_merge(a_out: Tensor, a_lse: Tensor, b_out: Tensor, b_lse: Tensor, dst_out: Tensor, dst_lse: Tensor) -> None:
    """The same merge in plain torch, computed in at least fp32 (fp64 for fp64 destinations)."""
    lt = torch.promote_types(dst_lse.dtype, torch.float32)
    ot = torch.promote_types(dst_out.dtype, torch.float32)
    diff = b_lse.to(lt) - a_lse.to(lt)
    w = torch.sigmoid(diff).unsqueeze(-1).to(ot)
    seen = b_lse > float("-inf")  # b_out is unset where b has no keys: a's rows there (lse -inf kept)
    dst_out.copy_(torch.where(seen.unsqueeze(-1), torch.lerp(a_out.to(ot), b_out.to(ot), w), a_out.to(ot)))
    # log(e^a + e^b) exactly: a + softplus(diff) with torch's softplus would return diff itself above its
    # threshold (20), dropping up to 2e-9, below fp32's resolution but not fp64's
    dst_lse.copy_(torch.where(seen, torch.logaddexp(a_lse.to(lt), b_lse.to(lt)), a_lse.to(lt)))


def merge_to(a_out: Tensor, a_lse: Tensor, b_out: Tensor, b_lse: Tensor, dst_out: Tensor, dst_lse: Tensor, *,
             fused: bool = True) -> None:
    """Merge partial result ``b`` into ``a``, writing ``dst`` (may alias ``a``); see the module doc.
    ``fused=False`` always takes the torch path."""
    if not (a_out.shape == b_out.shape == dst_out.shape and a_lse.shape == b_lse.shape == dst_lse.shape
            and tuple(a_out.shape[:3]) == tuple(a_lse.shape)):
        raise ValueError(f"merge_to: shapes differ: a {tuple(a_out.shape)}/{tuple(a_lse.shape)}, b "
                         f"{tuple(b_out.shape)}/{tuple(b_lse.shape)}, "
                         f"dst {tuple(dst_out.shape)}/{tuple(dst_lse.shape)}")
    kern = _kernel() if fused and a_out.is_cuda else False
    if not kern or any(t.stride(-1) != 1 for t in (a_out, b_out, dst_out)) or a_out.numel() == 0 \
            or dst_lse.dtype != torch.float32:
        with torch.no_grad():
            _torch_merge(a_out, a_lse, b_out, b_lse, dst_out, dst_lse)
        return
    fn, next_pow2 = kern
    bsz, h, s, d = a_out.shape
    block_d = next_pow2(d)
    block_s = max(1, min(64, 8192 // block_d))
    grid = (triton_cdiv(s, block_s), h, bsz)
    in_place = dst_out.data_ptr() == a_out.data_ptr() and dst_out.stride() == a_out.stride() \
        and dst_out.dtype == a_out.dtype
    fn[grid](a_out, *a_out.stride()[:3], a_lse, *a_lse.stride(),
             b_out, *b_out.stride()[:3], b_lse, *b_lse.stride(),
             dst_out, *dst_out.stride()[:3], dst_lse, *dst_lse.stride(),
             s, d, BLOCK_S=block_s, BLOCK_D=block_d, IN_PLACE=in_place)


def triton_cdiv(a: int, b: int) -> int:
    """Ceil division."""
    return -(-a // b)
