"""Version-robust calls: aten ops bound by schema argument names, Python functions by signature.

The private SDPA ops and the flash-attn / Transformer Engine entry points have changed argument lists and
names across releases. Instead of hard-coding one positional order, the callers here give values by
(canonical) name, and the target's schema or signature, read at run time, decides what is passed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["BoundOp", "call_aten", "call_python", "has_aten_op", "named_returns", "op_schema_text"]

# Alternative spellings seen across torch versions -> the canonical names used by callers.
_ALIASES: dict[str, str] = {
    "grad_out_": "grad_out",
    "log_sumexp": "logsumexp",
    "softmax_logsumexp": "logsumexp",
    "rng_state": "philox_seed",  # flash forward returns (rng_state, unused) ...
    "unused": "philox_offset",  # ... which its backward takes as (philox_seed, philox_offset)
    "bias": "attn_bias",
}


def _canonical(name: str) -> str:
    return _ALIASES.get(name, name)


def _is_optional(arg: Any) -> bool:
    try:
        return arg.type.kind() == "OptionalType"
    except Exception:  # pragma: no cover - very old/odd schema objects
        return str(arg.type).endswith("?") or str(arg.type).startswith("Optional")


def op_schema_text(op: Any) -> str:
    """The schema of an aten OpOverload as text (for error messages)."""
    try:
        return str(op._schema)
    except Exception:  # pragma: no cover
        return repr(op)


# Process-wide memos of pure functions of this torch build's op schemas (no group, option or shape in them;
# bounded by the few ops the kernels call), kept beside the kernel registry as its only other global state.
_BINDINGS: dict[tuple, tuple[tuple[str, str | None], ...]] = {}
_RETURN_NAMES: dict[Any, list[str]] = {}


def _binding(op: Any, keys: frozenset[str], ignorable: frozenset[str]) -> tuple[tuple[str, str | None], ...]:
    """(schema argument name, canonical value key or None for "pass None") for this op and value keys."""
    schema = op._schema
    plan: list[tuple[str, str | None]] = []
    used: set[str] = set()
    for arg in schema.arguments:
        key = _canonical(arg.name)
        if key in keys:
            plan.append((arg.name, key))
            used.add(key)
        elif arg.has_default_value():
            continue
        elif _is_optional(arg):
            plan.append((arg.name, None))
        else:
            raise RuntimeError(
                f"cannot call {schema.name}: no value for its required argument {arg.name!r}. "
                f"Schema of this torch build: {schema}"
            )
    extra = set(keys) - used - set(ignorable)
    if extra:
        raise RuntimeError(
            f"cannot call {schema.name}: this torch build's schema has no argument(s) {sorted(extra)}. Schema: {schema}"
        )
    return tuple(plan)


def call_aten(op: Any, values: Mapping[str, Any], *, ignorable: Iterable[str] = (),
              fast: Callable[..., Any] | None = None) -> Any:
    """Call an aten ``OpOverload`` with keyword arguments chosen by its schema.

    Every schema argument is filled from ``values`` (by canonical name); missing ones with a default are left
    out, missing optional tensors get None. A required argument with no value, or a value the schema does not
    take (unless named in ``ignorable``), raises RuntimeError showing the schema. The binding is worked out
    once per (op, value names) and cached: per call only a dict is built. ``fast`` is the same op's native
    Python binding (e.g. ``torch._scaled_dot_product_cudnn_attention``) when one exists: it takes the same
    keywords and parses them in C++, cheaper than the generic ``torch.ops`` path.
    """
    keys = frozenset(values)
    ign = ignorable if isinstance(ignorable, frozenset) else frozenset(ignorable)
    bkey = (op, keys, ign)
    plan = _BINDINGS.get(bkey)
    if plan is None:
        plan = _BINDINGS[bkey] = _binding(op, keys, ign)
    return (fast or op)(**{name: (values[key] if key is not None else None) for name, key in plan})


class BoundOp:
    """An aten op bound once, by schema argument names, to a fixed set of value keys (the same rules as
    :func:`call_aten`); each call then passes a mapping with those keys. Arguments go positionally up to
    the first one the schema would have to skip, and the result's canonical return names are resolved once
    (``index``). For hot paths where :func:`call_aten`'s per-call work shows up in the host time."""

    def __init__(self, op: Any, keys: Iterable[str], *, ignorable: Iterable[str] = (),
                 fast: Callable[..., Any] | None = None, fallback_returns: Sequence[str] = ()):
        plan = dict(_binding(op, frozenset(keys), frozenset(ignorable)))
        positional, keyword = [], []
        in_order = True
        for arg in op._schema.arguments:
            if arg.name not in plan:  # left to its default: later arguments must be named
                in_order = False
                continue
            if in_order and not getattr(arg, "kwarg_only", True):
                positional.append(plan[arg.name])
            else:
                keyword.append((arg.name, plan[arg.name]))
        self._positional = tuple(positional)
        self._keyword = tuple(keyword)
        self._target = fast or op
        try:
            names = [_canonical(r.name) for r in op._schema.returns]
        except Exception:  # pragma: no cover
            names = []
        if not all(names) or len(set(names)) != len(names):
            names = list(fallback_returns)
        self.index = {name: i for i, name in enumerate(names)}

    def __call__(self, values: Mapping[str, Any]) -> Any:
        args = [values[key] if key is not None else None for key in self._positional]
        if self._keyword:
            return self._target(*args, **{name: (values[key] if key is not None else None)
                                          for name, key in self._keyword})
        return self._target(*args)


def named_returns(op: Any, result: Sequence[Any], fallback: Sequence[str]) -> dict[str, Any]:
    """Map an op's tuple result to canonical return names (schema names, else ``fallback``)."""
    result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    names = _RETURN_NAMES.get(op)
    if names is None:
        try:
            names = [_canonical(r.name) for r in op._schema.returns]
        except Exception:  # pragma: no cover
            names = []
        _RETURN_NAMES[op] = names
    if len(names) != len(result) or not all(names):
        names = list(fallback)
    if len(names) < len(result):
        names = names + [f"_ret{i}" for i in range(len(names), len(result))]
    return dict(zip(names, result))


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """Signature of fn; looks through torch.library.custom_op wrappers, whose own signature is (*a, **kw)."""
    candidates = [fn, getattr(fn, "_init_fn", None), getattr(fn, "__wrapped__", None)]
    for cand in candidates:
        if cand is None:
            continue
        try:
            sig = inspect.signature(cand)
        except (TypeError, ValueError):
            continue
        kinds = {p.kind for p in sig.parameters.values()}
        if kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            continue
        return sig
    raise RuntimeError(f"cannot read the signature of {fn!r}")


def call_python(
    fn: Callable[..., Any],
    values: Mapping[str, Any],
    *,
    none_ok: Iterable[str] = (),
    what: str = "",
) -> Any:
    """Call ``fn`` passing, by name, every parameter of its signature that ``values`` provides.

    Parameters without a default that ``values`` lacks get None when listed in ``none_ok``; otherwise a
    RuntimeError names the unsupported signature. Values the signature does not take are ignored, so callers
    may offer several spellings (``window_size`` and ``window_size_left``/``_right``).
    """
    sig = _signature(fn)
    none_ok = set(none_ok)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.name in values:
            val = values[p.name]
        elif p.default is not inspect.Parameter.empty:
            if p.kind != inspect.Parameter.POSITIONAL_ONLY:
                continue
            val = p.default
        elif p.name in none_ok:
            val = None
        else:
            raise RuntimeError(
                f"{what or getattr(fn, '__name__', fn)}: unsupported signature {sig}: "
                f"no value for required parameter {p.name!r}"
            )
        if p.kind == inspect.Parameter.POSITIONAL_ONLY:
            args.append(val)
        else:
            kwargs[p.name] = val
    return fn(*args, **kwargs)


def has_aten_op(name: str) -> bool:
    """True when ``torch.ops.aten.<name>`` exists in this torch build."""
    try:
        getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    return True
