"""Option values shared by the engine, the cost model, the Megatron flags and the CLI (pure Python).

``keep_kv``: keep the KV pieces received in the forward for the backward. One parser for every entry
point (``tasp_attention(keep_kv=...)``, ``MEGATRON_TASP_KEEP_KV``, ``--tasp-keep-kv``, ``bench --keep-kv``)
and one 'auto' rule for the engine and the cost model.
"""

from __future__ import annotations

import os
from typing import Any

KEEP_KV_AUTO_MIB = 64.0  # default cap of what 'auto' keeps per call; MEGATRON_TASP_KEEP_KV_MIB overrides

_KEEP_WORDS: dict[str, bool | str] = {"auto": "auto", "1": True, "true": True, "yes": True, "on": True,
                                      "0": False, "false": False, "no": False, "off": False}


def parse_keep_kv(value: Any) -> bool | str:
    """True, False or 'auto' from a bool or a word (auto, 1/0, true/false, yes/no, on/off; any case);
    raises ValueError otherwise."""
    if isinstance(value, bool):
        return value
    word = _KEEP_WORDS.get(str(value).strip().lower()) if isinstance(value, str) else None
    if word is None:
        raise ValueError(f"keep_kv must be True, False or 'auto' (or 1/0, true/false, on/off), got {value!r}")
    return word


def keep_kv_cap_bytes() -> float:
    """Bytes 'auto' keeps at most per call: ``MEGATRON_TASP_KEEP_KV_MIB`` (default 64) MiB."""
    text = os.environ.get("MEGATRON_TASP_KEEP_KV_MIB")
    if text is None:
        return KEEP_KV_AUTO_MIB * 2**20
    try:
        return float(text) * 2**20
    except ValueError:
        raise ValueError(f"MEGATRON_TASP_KEEP_KV_MIB must be a number of MiB, got {text!r}") from None


def keep_kv_auto(world_size: int, local_kv_bytes: int, transport: str) -> bool:
    """What keep_kv='auto' decides: keep the (n - 1) received pieces (each the size of the local K plus V)
    when they fit under :func:`keep_kv_cap_bytes` and the transport allocates per call (not 'symm', whose
    two persistent buffers are shared by every call)."""
    return transport != "symm" and (world_size - 1) * local_kv_bytes <= keep_kv_cap_bytes()


__all__ = ["KEEP_KV_AUTO_MIB", "keep_kv_auto", "keep_kv_cap_bytes", "parse_keep_kv"]
