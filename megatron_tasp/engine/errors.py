"""The engine's one error type (public as ``megatron_tasp.attention.TaspConfigError``)."""

from __future__ import annotations


class TaspConfigError(ValueError):
    """Inputs or options that TASP cannot serve; the message names the fix."""
