"""The Triton kernels (the merge, the row fill, the pair add) on CPU, in Triton's interpreter, against torch.

Skipped unless Triton is importable (it is not a dependency, and the CPU test environment does not install it:
``pip install triton`` adds about 1 GB). Each check runs in a fresh process with ``TRITON_INTERPRET=1`` (read when
the kernels are compiled, which each module does once per process), launching the module's compiled kernel
directly on CPU tensors with the launch parameters of its public function, which sends only CUDA tensors to
Triton. The GPU tests (tests/gpu) run the same kernels compiled for the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

_PRELUDE = """
import torch
g = torch.Generator().manual_seed(3)
"""

_MERGE = """
from megatron_tasp.kernels import fused_merge as fm
fn, next_pow2 = fm._kernel()
for in_place in (False, True):
    a, b = (torch.randn(1, 2, 300, 32, generator=g) for _ in range(2))
    la, lb = (torch.randn(1, 2, 300, generator=g) * 3 for _ in range(2))
    lb[:, :, 40:170] = float("-inf")  # b has no keys there: b_out unset (NaN), never read
    b[:, :, 40:170] = float("nan")
    la[:, :, 60:90] = float("-inf")  # neither has keys: a's row and lse -inf stay
    ref, ref_l = torch.empty_like(a), torch.empty_like(la)
    fm._torch_merge(a, la, b, lb, ref, ref_l)
    dst, dl = (a.clone(), la.clone()) if in_place else (torch.empty_like(a), torch.empty_like(la))
    src, src_l = (dst, dl) if in_place else (a, la)
    bsz, h, s, d = a.shape
    block_d = next_pow2(d)
    block_s = max(1, min(64, 8192 // block_d))
    fn[(fm.triton_cdiv(s, block_s), h, bsz)](src, *src.stride()[:3], src_l, *src_l.stride(), b, *b.stride()[:3],
                                             lb, *lb.stride(), dst, *dst.stride()[:3], dl, *dl.stride(), s, d,
                                             BLOCK_S=block_s, BLOCK_D=block_d, IN_PLACE=in_place)
    assert torch.isfinite(dst).all() and torch.equal(dst[:, :, 40:170], a[:, :, 40:170]), in_place
    assert (dst - ref).abs().max() <= 1e-5 and torch.equal(dl.isinf(), ref_l.isinf()), in_place
    assert (dl - ref_l)[torch.isfinite(ref_l)].abs().max() <= 1e-5, in_place
print("merge ok")
"""

_FILL = """
from megatron_tasp.kernels import rowfill
fn, cdiv = rowfill._kernel()
for dtype in (torch.float32, torch.float16):
    x = torch.randn(50, 2, 3, 700, generator=g).to(dtype)[:, 1]  # rows of 2100 elements, row stride 4200
    rows = torch.tensor([0, 7, 8, 49])
    want = x.clone().index_fill_(0, rows, -2.5)
    row_len = x[0].numel()
    fn[(rows.numel(), cdiv(row_len, rowfill._BLOCK))](x, rows, x.stride(0), row_len, -2.5, BLOCK=rowfill._BLOCK)
    assert torch.equal(x, want), dtype
print("fill ok")
"""

_ADD = """
from megatron_tasp.kernels import pairadd
fn, cdiv = pairadd._kernel()
for dtype in (torch.float32, torch.float16):
    pair = torch.randn(37, 2, 9, 128, generator=g).to(dtype)
    a0, a1 = (torch.randn(37, 9, 128, generator=g).to(dtype) for _ in range(2))
    assert pairadd._fits(a0, a1, pair)
    out0, out1 = torch.empty_like(a0), torch.empty_like(a1)
    row_len = a0[0].numel()
    fn[(a0.shape[0], cdiv(row_len, pairadd._BLOCK))](a0, a1, pair, out0, out1, pair.stride(0), pair.stride(1),
                                                     row_len, BLOCK=pairadd._BLOCK)
    assert torch.equal(out0, a0 + pair[:, 0]) and torch.equal(out1, a1 + pair[:, 1]), dtype
print("add ok")
"""


@pytest.mark.parametrize("name,body", [("merge", _MERGE), ("fill", _FILL), ("add", _ADD)])
def test_triton_kernel_in_the_interpreter(name, body, tmp_path):
    """Each kernel equals torch's op on CPU tensors; the merge keeps a's rows where b has no keys (also where a
    has none either: lse -inf, no NaN), in place and into another tensor."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    # run outside the checkout: the package comes from the environment (PYTHONPATH first), as installed
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{name} ok" in run.stdout
