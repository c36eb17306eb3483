"""Triton kernels built once per process, at their first use, or not at all where Triton cannot be imported."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["lazy_triton"]


def lazy_triton(build: Callable[[Any, Any], T]) -> Callable[[], T | bool]:
    """Decorator: ``build(triton, triton.language)`` defines a ``@triton.jit`` kernel and returns what its caller
    launches. The decorated name becomes a function of no arguments that returns that, built at its first call,
    or False when Triton cannot be imported (the caller then takes its torch path). Process-wide by design, like
    the kernel registry: a compiled kernel is state Triton keeps per process anyway. A build that raises is
    retried at the next call."""
    built: list[T | bool] = []

    def get() -> T | bool:
        if not built:
            try:
                import triton
                import triton.language as tl
            except Exception:  # noqa: BLE001 - Triton missing or broken: the caller's torch path
                built.append(False)
            else:
                built.append(build(triton, tl))
        return built[0]

    get.__doc__ = build.__doc__
    return get
