"""Experimental block kernels, registered only on an explicit ``import megatron_tasp.kernels.experimental``.

They wrap packages this project cannot install on its own machines, so no test has run them on real
hardware (the unit tests drive them through fake modules): ``flash_attn`` (the flash-attn package) and
``te`` (Transformer Engine fused attention). Importing this package is the opt-in; afterwards they are
chosen by name only (``kernel="te"``), never by "auto".
"""

from __future__ import annotations

from megatron_tasp.kernels.experimental import flash_attn_pkg, te

__all__ = ["flash_attn_pkg", "te"]
