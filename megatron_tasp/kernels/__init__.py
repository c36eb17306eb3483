"""Block attention kernels: (out, lse) forward and a backward that takes the merged out/lse.

This layer knows nothing about rings or communication. See :mod:`megatron_tasp.kernels.base` for the exact
contract. Backends (registered by name, chosen at run time):

=============  ==========================================================================================
``cpu``        ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward); GQA native
``math``       plain PyTorch in float32 on any device; the oracle and last resort; GQA by broadcasting
``cudnn``      ``aten._scaled_dot_product_cudnn_attention`` (+ backward); GQA native; Hopper default
``flash``      ``aten._scaled_dot_product_flash_attention`` (FA2 in torch); GQA native
``efficient``  ``aten._scaled_dot_product_efficient_attention``; GQA by expansion + group sum
=============  ==========================================================================================

``get_kernel(None | "auto", ...)``: CPU tensors -> ``cpu``; CUDA -> ``cudnn`` on compute capability >= 9.0,
else ``flash``, else ``efficient``, else ``math`` (first one available). An explicitly named backend that
cannot run raises RuntimeError: never silently substituted. (The engine's kernel comes from
``TaspOptions.kernel``, whose default the environment variable ``MEGATRON_TASP_KERNEL`` sets; this module
reads no environment.)

Experimental kernels (opt-in). Backends that no test has run on real hardware live in
:mod:`megatron_tasp.kernels.experimental` and register only when that package is imported explicitly::

    import megatron_tasp.kernels.experimental  # registers "flash_attn" and "te"

``flash_attn``  the flash-attn package (FA3 on Hopper if installed, else FA2); lazy import of the package
``te``          Transformer Engine fused attention; lazy import of TE

Naming one of them without the import raises a ValueError that names the import. "auto" never picks them.

Document masks: :mod:`megatron_tasp.kernels.segmented` wraps any of these kernels into a block masked to
equal segment ids (one dense call per shared segment), what packed documents (THD) run.
"""

from __future__ import annotations

import torch

from . import cpu as _cpu  # noqa: F401  (registers "cpu")
from . import math_ref as _math_ref  # noqa: F401  (registers "math")
from . import sdpa as _sdpa  # noqa: F401  (registers "cudnn", "flash", "efficient")
from .base import KERNEL_REGISTRY, BlockAttention, register_kernel
from .merge import merge_finite_, merge_into, new_accumulators

__all__ = [
    "EXPERIMENTAL_KERNELS",
    "KERNEL_REGISTRY",
    "BlockAttention",
    "auto_order",
    "available_kernels",
    "get_kernel",
    "kernel_names",
    "merge_finite_",
    "merge_into",
    "new_accumulators",
    "register_kernel",
]

#: Names registered by ``import megatron_tasp.kernels.experimental`` (opt-in, see the module doc).
EXPERIMENTAL_KERNELS = ("flash_attn", "te")


def kernel_names() -> list[str]:
    """All registered backend names (whether or not they can run here)."""
    return list(KERNEL_REGISTRY)


def auto_order(device: torch.device | str) -> tuple[str, ...]:
    """Preference order that "auto" tries for tensors on ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return ("cpu", "math")
    if device.type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device if device.index is not None else None)
        if major >= 9:
            return ("cudnn", "flash", "efficient", "math")
        return ("flash", "efficient", "math")
    return ("math",)


def available_kernels(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Names of the registered backends that can run blocks of this device, dtype and head dim."""
    return [n for n, cls in KERNEL_REGISTRY.items() if cls.is_available(device, dtype, head_dim)]


def get_kernel(name: str | None, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> BlockAttention:
    """The block-attention backend ``name`` (or "auto"/None) for this device, dtype and head dim.

    Raises ValueError for an unknown name and RuntimeError (with the reason and the alternatives) when the
    requested backend cannot run here.
    """
    device = torch.device(device)
    where = f"device={device}, dtype={dtype}, head_dim={head_dim}"
    source = "requested"
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        reasons = []
        for cand in auto_order(device):
            cls = KERNEL_REGISTRY[cand]
            why = cls.unavailable_reason(device, dtype, head_dim)
            if why is None:
                return cls()
            reasons.append(f"{cand}: {why}")
        raise RuntimeError(f"no attention kernel can run for {where}: " + "; ".join(reasons))
    if not isinstance(name, str):
        raise ValueError(f"kernel name must be a string or None, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in KERNEL_REGISTRY:
        if key in EXPERIMENTAL_KERNELS:
            raise ValueError(f"attention kernel {key!r} is experimental and not registered: run "
                             "'import megatron_tasp.kernels.experimental' first to opt in")
        valid = ", ".join(["auto", *KERNEL_REGISTRY])
        raise ValueError(f"unknown attention kernel {name!r} ({source}); valid names: {valid}")
    cls = KERNEL_REGISTRY[key]
    why = cls.unavailable_reason(device, dtype, head_dim)
    if why is not None:
        alternatives = [n for n in available_kernels(device, dtype, head_dim) if n != key]
        alt = ", ".join(alternatives) if alternatives else "none"
        raise RuntimeError(f"attention kernel {key!r} ({source}) cannot run for {where}: {why}. Available here: {alt}")
    return cls()
