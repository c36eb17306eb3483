"""The "flash_attn" backend: the flash-attn package (FA3 Hopper interface if installed, else FA2).

EXPERIMENTAL: flash-attn cannot be installed on this project's machines, so this path is written against the
published interfaces and has not been run here. Entry points (bound by parameter NAME at run time, so the
argument lists of 2.5 ... 2.8 and of FA3 all fit):

* FA2 ``flash_attn.flash_attn_interface._flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal,
  window_size | window_size_left/right, softcap, alibi_slopes, return_softmax)`` -> ``(out, lse, S, rng_state)``
  (>= 2.6) or ``(out, q, k, v, out_padded, lse, S, rng_state)`` (older); ``_flash_attn_backward(dout, q, k, v,
  out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, ..., deterministic, rng_state)`` fills dq/dk/dv.
* FA3 ``flash_attn_interface._flash_attn_forward(q, k, v, ..., softmax_scale, causal, ...)`` -> ``(out, lse,
  ...)``; ``_flash_attn_backward(dout, q, k, v, out, softmax_lse, ..., dq, dk, dv, softmax_scale, is_causal,
  ...)``.

Layout there is ``[b, s, h, d]``: the ``[b, h, s, d]`` inputs are passed as transposed views (no copy when the
last dim is contiguous). Both versions take fewer KV heads directly (GQA) and return lse ``[b, h, sq]``.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .._calls import call_python
from ..base import BlockAttention, last_dim_contiguous, register_kernel

__all__ = ["FlashAttnPackageAttention"]

_NONE_OK = (
    "k_new", "v_new", "qv", "out", "out_", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new", "seqused_q",
    "seqused_k", "sequed_q", "sequed_k", "max_seqlen_q", "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k",
    "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale", "k_descale", "v_descale", "scheduler_metadata",
    "alibi_slopes", "block_table", "pack_gqa", "generator", "gen_",
)  # fmt: skip


@dataclass
class _FlashAttnModule:
    module: ModuleType
    version: int  # 2 or 3


@functools.cache
def _load(prefer_v3: bool) -> _FlashAttnModule | str:
    """The flash-attn interface module, or a string saying why none could be imported."""
    errors: list[str] = []
    names = (("flash_attn_interface", 3), ("flash_attn.flash_attn_interface", 2))
    if not prefer_v3:
        names = names[1:]
    for modname, ver in names:
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken binary build
            errors.append(f"{modname}: {type(exc).__name__}: {exc}")
            continue
        if hasattr(mod, "_flash_attn_forward") and hasattr(mod, "_flash_attn_backward"):
            return _FlashAttnModule(mod, ver)
        errors.append(f"{modname}: has no _flash_attn_forward/_flash_attn_backward")
    return "flash-attn is not importable (" + "; ".join(errors) + ")"


def _common_values(scale: float, causal: bool) -> dict[str, Any]:
    return {
        "dropout_p": 0.0, "softmax_scale": scale, "causal": causal, "is_causal": causal, "window_size": (-1, -1),
        "window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
        "return_softmax": False, "deterministic": False, "num_splits": 1,
    }  # fmt: skip


@register_kernel
class FlashAttnPackageAttention(BlockAttention):
    """Tri Dao's flash-attn package (experimental, untested here), imported lazily."""

    name = "flash_attn"

    @staticmethod
    def _module(device: torch.device) -> _FlashAttnModule | str:
        cc = torch.cuda.get_device_capability(device if device.index is not None else None)
        return _load(prefer_v3=cc[0] == 9)

    @classmethod
    def unavailable_reason(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return f"needs a CUDA device, got {device.type}"
        if not torch.cuda.is_available():
            return "CUDA is not available in this process"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {dtype} is not supported (bf16/fp16 only)"
        if head_dim <= 0 or head_dim % 8 != 0 or head_dim > 256:
            return f"head_dim must be a positive multiple of 8 and <= 256, got {head_dim}"
        mod = cls._module(device)
        return mod if isinstance(mod, str) else None

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        fa = self._module(q.device)
        assert not isinstance(fa, str), fa
        qt, kt, vt = (last_dim_contiguous(x).transpose(1, 2) for x in (q, k, v))  # [b, s, h, d] views
        values = dict(_common_values(scale, causal), q=qt, k=kt, v=vt)
        res = call_python(fa.module._flash_attn_forward, values, none_ok=_NONE_OK, what="flash_attn forward")
        res = tuple(res) if isinstance(res, (tuple, list)) else (res,)
        b, h, sq, _ = q.shape
        if len(res) >= 6 and fa.version == 2 and res[5].dim() == 3:
            out_t, lse, rng = res[0], res[5], (res[7] if len(res) > 7 else None)  # flash-attn <= 2.5
        elif len(res) >= 2:
            out_t, lse = res[0], res[1]
            rng = res[3] if (fa.version == 2 and len(res) >= 4) else None
        else:
            raise RuntimeError(f"unexpected flash_attn forward result of length {len(res)}")
        if lse.dim() != 3 or tuple(lse.shape[:2]) != (b, h) or lse.shape[2] < sq:
            raise RuntimeError(f"unexpected flash_attn softmax_lse shape {tuple(lse.shape)}; expected ({b}, {h}, {sq})")
        out = out_t[..., : q.shape[-1]].transpose(1, 2)
        return out, lse[..., :sq].to(torch.float32).contiguous(), {"rng_state": rng}

    def _backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: Any,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        fa = self._module(q.device)
        assert not isinstance(fa, str), fa
        qt, kt, vt = (last_dim_contiguous(x).transpose(1, 2) for x in (q, k, v))
        dq = torch.empty(qt.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(kt.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(vt.shape, dtype=v.dtype, device=v.device)
        values = dict(
            _common_values(scale, causal),
            dout=last_dim_contiguous(dout.to(q.dtype)).transpose(1, 2),
            q=qt,
            k=kt,
            v=vt,
            out=last_dim_contiguous(out.to(q.dtype)).transpose(1, 2),
            softmax_lse=lse.to(torch.float32).contiguous(),
            dq=dq,
            dk=dk,
            dv=dv,
            rng_state=(ctx or {}).get("rng_state"),
        )
        call_python(fa.module._flash_attn_backward, values, none_ok=_NONE_OK, what="flash_attn backward")
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
