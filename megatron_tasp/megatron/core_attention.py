"""``TaspDotProductAttention``: TASP context parallelism behind Megatron-Core's core-attention contract.

Megatron builds core attention as ``submodules.core_attention(config=..., layer_number=...,
attn_mask_type=..., attention_type=..., cp_comm_type=..., softmax_scale=..., pg_collection=...)`` (MLA
also passes ``k_channels``/``v_channels``) and calls ``forward(query, key, value, attention_mask,
attn_mask_type=..., attention_bias=..., packed_seq_params=...)`` with sbhd tensors: query
``[s/cp, b, np, hn]``, key/value ``[s/cp, b, ng, hn]`` (GQA not expanded), RoPE applied, local tokens in
Megatron's zigzag layout ``[chunk r | chunk 2cp-1-r]``. It returns ``[s/cp, b, np*hn]``.

Packed documents (``packed_seq_params`` with ``qkv_format="thd"``, self-attention): query ``[t, np, hn]``
(or ``[t, 1, np, hn]``), key/value ``[t, ng, hn]``, the tokens ``megatron_tasp.thd.partition_index`` gives
this rank (Transformer Engine's THD layout; ``megatron_tasp.megatron.thd_batch`` splits batches so). The
documents' lengths go to ``tasp_attention`` as ``cu_seqlens`` (``cu_seqlens_q``) and ``cu_seqlens_padded``
(``cu_seqlens_q_padded``, or ``cu_seqlens_q`` when not given); the result is ``[t, np*hn]``, as TE's, which
Megatron's attention reshapes to ``[t, 1, np*hn]``. Different query and key/value lengths, formats other than
"thd" and dynamic CP groups fail closed.

Per-layer ``cp_comm_type`` lists: Megatron hands each layer its own entry. Entries "tasp" (and None, i.e.
CP == 1 or no type configured) build this module; any other entry ("p2p", "a2a", "all_gather",
"a2a+p2p") builds Megatron's ``TEDotProductAttention`` instead (constructing this class then returns
the TE module), so one spec serves mixed layouts. Without Transformer Engine that raises a clear error.

Options: one :class:`megatron_tasp.options.TaspOptions`, passed as the ``options`` keyword (put there by
``tasp_layer_spec(spec, options=...)`` through ``ModuleSpec.params``); without it ``default_options()``
(defaults with the ``MEGATRON_TASP_*`` environment's overrides). The topology is loaded and checked against
the CP size when the module is built. Options given the old way (``config.tasp_*`` attributes or
``tasp_*`` keywords) are refused with an error naming ``tasp_layer_spec(spec, options=...)``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from typing import Any

import torch

from megatron_tasp.megatron.cpu_compat import prepare_megatron_import
from megatron_tasp.options import FIELDS, TaspOptions, default_options

prepare_megatron_import()

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402

TASP_COMM_TYPE = "tasp"
_SUPPORTED_MASKS = ("causal", "no_mask", "causal_bottom_right")
# Keywords some Megatron versions pass that carry no meaning for TASP (ignored when given).
_IGNORED_KWARGS = frozenset({"num_splits", "pp_layer_offset", "name", "model_comm_pgs"})
_OLD_WAY_FIX = "pass options through tasp_layer_spec(spec, options=TaspOptions(...)) (megatron_tasp.megatron.spec)"
logger = logging.getLogger("megatron_tasp")


def normalize_comm_type(value: str | None) -> str | None:
    """Lower-case and strip a cp_comm_type entry; map the "allgather" misspelling to "all_gather"."""
    if value is None:
        return None
    v = str(value).strip().lower()
    if v == "allgather":
        logger.warning("cp_comm_type 'allgather' is spelled 'all_gather' in Transformer Engine; using 'all_gather'")
        v = "all_gather"
    return v


def is_tasp_comm_type(value: str | None) -> bool:
    """True for the entries this module serves itself: None (no CP type) and "tasp"."""
    return value is None or str(value).strip().lower() == TASP_COMM_TYPE


def _te_dot_product_attention(cp_comm_type: str, layer_number: Any) -> type:
    """Return Megatron's TEDotProductAttention class, or raise a clear error naming the fix."""
    fix = (f"layer {layer_number} has cp_comm_type '{cp_comm_type}', which is served by Transformer Engine "
           "(megatron.core.extensions.transformer_engine.TEDotProductAttention), but Transformer Engine is not "
           "installed. Install transformer-engine, or set this layer's cp_comm_type entry to 'tasp'.")
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except Exception as exc:  # noqa: BLE001 - any import failure means TE is unusable here
        raise ImportError(fix) from exc
    if not getattr(te_ext, "HAVE_TE", False) or not isinstance(getattr(te_ext, "TEDotProductAttention", None), type):
        raise ImportError(fix)
    return te_ext.TEDotProductAttention


def _mask_name(mask: Any) -> str:
    return mask.name if isinstance(mask, AttnMaskType) else str(mask)


def _check_mask_type(mask: Any, where: str) -> str:
    name = _mask_name(mask)
    if name not in _SUPPORTED_MASKS:
        raise NotImplementedError(
            f"TaspDotProductAttention supports attention mask types causal and no_mask; got {name} ({where}). "
            "Padding and arbitrary masks are not implemented: use Transformer Engine's attention for this model.")
    return name


def _cp_group_from(pg_collection: Any) -> Any:
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is not None:
        return group
    from megatron.core import parallel_state

    try:
        return parallel_state.get_context_parallel_group(check_initialized=False)
    except TypeError:  # older signature
        return parallel_state.get_context_parallel_group()


def _refuse_old_way(config: Any, kwargs: dict[str, Any]) -> None:
    """Fail closed on options given as ``config.tasp_*`` attributes or ``tasp_*`` keywords (no longer read)."""
    keys = sorted(k for k in kwargs if k.startswith("tasp_"))
    if keys:
        raise TypeError(f"TaspDotProductAttention no longer takes {', '.join(keys)}: {_OLD_WAY_FIX}")
    attrs = sorted(k for k in vars(config) if k.startswith("tasp_") and k[5:] in FIELDS) \
        if hasattr(config, "__dict__") else []
    if attrs:
        raise TypeError(f"config.{', config.'.join(attrs)} is no longer read by TaspDotProductAttention: "
                        f"{_OLD_WAY_FIX}")


def _resolve_tasp_attention() -> Any:
    """The TASP attention function, looked up at call time (so tests can substitute the module)."""
    return importlib.import_module("megatron_tasp.attention").tasp_attention


def _pad_head_dims(query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Zero-pad q/k or v to one head dim (q.k unchanged: the scale is explicit; extra v columns give zero
    output columns, dropped by the caller); returns the padded tensors and v's original head dim."""
    dq, dv = query.shape[-1], value.shape[-1]
    d = max(dq, dv)
    if dq < d:
        query = torch.nn.functional.pad(query, (0, d - dq))
        key = torch.nn.functional.pad(key, (0, d - dq))
    if dv < d:
        value = torch.nn.functional.pad(value, (0, d - dv))
    return query, key, value, dv


def _as_thd(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[t, h, d]`` as is, ``[t, 1, h, d]`` squeezed; anything else fails closed."""
    if x.dim() == 4 and x.shape[1] == 1:
        return x.squeeze(1)
    if x.dim() == 3:
        return x
    raise ValueError(f"packed (THD) {name} must be [t, heads, dim] or [t, 1, heads, dim], got {tuple(x.shape)}: "
                     "packed batches carry one flattened sequence (Megatron's flatten_batch_for_packed_sequences)")


def _cu(value: Any, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() < 2:
        raise ValueError(f"packed_seq_params.{name} must be a 1-D tensor [n_docs + 1], got "
                         f"{getattr(value, 'shape', type(value).__name__)}")
    return value if value.dtype == torch.int32 else value.to(torch.int32)


def _same(q: torch.Tensor | None, kv: torch.Tensor | None) -> bool:
    """Whether the key/value lengths equal the query's (kv not given: the query's)."""
    if kv is None or kv is q:
        return True
    if q is None:
        return False
    return q.shape == kv.shape and bool(torch.equal(q, kv.to(q.device)))


def _check_packed_params(packed_seq_params: Any, cp_size: int) -> None:
    """The checks of :func:`thd_cu_seqlens` that read no tensor: THD format, no dynamic CP group or size."""
    fmt = getattr(packed_seq_params, "qkv_format", None)
    if fmt != "thd":
        raise NotImplementedError(f"TaspDotProductAttention serves packed sequences in qkv_format 'thd' only, got "
                                  f"{fmt!r}: build PackedSeqParams(qkv_format='thd', ...)")
    if getattr(packed_seq_params, "cp_group", None) is not None:
        raise NotImplementedError("packed_seq_params.cp_group (dynamic / hybrid context parallelism) is not "
                                  "supported by TASP: drop --hybrid-context-parallel")
    local = getattr(packed_seq_params, "local_cp_size", None)
    if local is not None and int(local) != cp_size:
        raise NotImplementedError(f"packed_seq_params.local_cp_size={local} differs from the CP size {cp_size}: "
                                  "dynamic CP sizes (--hybrid-context-parallel) are not supported by TASP")


def thd_cu_seqlens(packed_seq_params: Any, cp_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cu_seqlens, cu_seqlens_padded)`` for ``tasp_attention`` from Megatron's PackedSeqParams.

    The padded lengths are ``cu_seqlens_q_padded`` or, when not given, ``cu_seqlens_q`` (every token real).
    Fails closed on anything TASP does not serve: a format other than "thd", different query and key/value
    lengths (cross-attention), a dynamic CP group (hybrid CP) or no cu_seqlens_q.
    """
    _check_packed_params(packed_seq_params, cp_size)
    cu_q = _cu(getattr(packed_seq_params, "cu_seqlens_q", None), "cu_seqlens_q")
    if cu_q is None:
        raise NotImplementedError("packed_seq_params (THD) without cu_seqlens_q is not supported: give the "
                                  "documents' cumulative lengths (Megatron-LM: --sft or --dataloader-inter-"
                                  "document-masking batches carry them)")
    pad_q = _cu(getattr(packed_seq_params, "cu_seqlens_q_padded", None), "cu_seqlens_q_padded")
    cu_kv = _cu(getattr(packed_seq_params, "cu_seqlens_kv", None), "cu_seqlens_kv")
    pad_kv = _cu(getattr(packed_seq_params, "cu_seqlens_kv_padded", None), "cu_seqlens_kv_padded")
    if not (_same(cu_q, cu_kv) and _same(pad_q, pad_kv)):
        raise NotImplementedError(
            "TaspDotProductAttention needs equal query and key/value document lengths in packed_seq_params "
            "(cu_seqlens_q == cu_seqlens_kv, cu_seqlens_q_padded == cu_seqlens_kv_padded): packed "
            "cross-attention is not supported; use Transformer Engine's attention for it")
    padded = pad_q if pad_q is not None else cu_q
    if padded.shape != cu_q.shape:
        raise ValueError(f"packed_seq_params.cu_seqlens_q_padded has {padded.numel()} entries but cu_seqlens_q has "
                         f"{cu_q.numel()}: give one entry per document boundary in both")
    return cu_q, padded


_BOUNDARY_FIELDS = ("cu_seqlens_q", "cu_seqlens_q_padded", "cu_seqlens_kv", "cu_seqlens_kv_padded")


def _versions(tensors: tuple) -> tuple | None:
    """In-place version counters of the boundary tensors (None when one cannot tell: an inference tensor)."""
    try:
        return tuple(None if t is None else t._version for t in tensors)
    except RuntimeError:  # inference-mode tensors track no version counter
        return None


def thd_host_boundaries(packed_seq_params: Any, cp_size: int = 1,
                        layer_number: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """:func:`thd_cu_seqlens` as host tuples ``(cu_seqlens, cu_seqlens_padded)``, read from the device once per
    pass over the layers.

    Megatron builds one PackedSeqParams per micro-batch and hands it to every layer in turn; reading the
    boundaries is a host synchronisation, so the values are kept on the object for the layers after the
    first. A layer reuses them only when a lower layer stored them in this pass (``layer_number`` above the
    storing layer's), the boundary tensors are the very same objects and their in-place version counters are
    unchanged; a new pass (the first layer again, a recomputed layer, or no layer number) reads them again, so
    a params object refilled in place between micro-batches (even by a collective, which leaves the version
    counter alone) is never served stale values. The checks that need no device read run on every call."""
    tensors = tuple(getattr(packed_seq_params, f, None) for f in _BOUNDARY_FIELDS)
    versions = _versions(tensors)
    cached = getattr(packed_seq_params, "_tasp_host_boundaries", None)
    if (cached is not None and versions is not None and layer_number is not None and layer_number > cached[3]
            and cached[1] == versions and all(a is b for a, b in zip(cached[0], tensors))):
        _check_packed_params(packed_seq_params, cp_size)
        packed_seq_params._tasp_host_boundaries = (*cached[:3], layer_number)
        return cached[2]
    cu, padded = thd_cu_seqlens(packed_seq_params, cp_size)
    both = torch.cat((cu.long(), padded.to(cu.device).long())).tolist()  # one host read for both
    host = (tuple(both[:cu.numel()]), tuple(both[cu.numel():]))
    if versions is not None and layer_number is not None:
        try:
            packed_seq_params._tasp_host_boundaries = (tensors, versions, host, layer_number)
        except (AttributeError, TypeError):  # a frozen or slotted params object: read again next time
            pass
    return host


class TaspDotProductAttention(MegatronModule):
    """Core attention computing TASP (multi-ring) context-parallel attention over ``pg_collection.cp``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Build TE's core attention instead when this layer's cp_comm_type is not "tasp"."""
        cp_comm_type = kwargs.get("cp_comm_type")
        if is_tasp_comm_type(cp_comm_type):
            return super().__new__(cls)
        comm = normalize_comm_type(cp_comm_type)
        te_cls = _te_dot_product_attention(comm, kwargs.get("layer_number"))
        accepted = inspect.signature(te_cls.__init__).parameters
        te_kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        te_kwargs["cp_comm_type"] = comm
        return te_cls(*args, **te_kwargs)

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        options: TaspOptions | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        _refuse_old_way(config, kwargs)
        if options is not None and not isinstance(options, TaspOptions):
            raise TypeError(f"TaspDotProductAttention options must be a TaspOptions, got {type(options).__name__}: "
                            "build one with megatron_tasp.options.parse_options({...})")
        unknown = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS and v is not None}
        if unknown:
            raise TypeError(f"TaspDotProductAttention got unsupported arguments: {sorted(unknown)}")

        self.config = config
        self.layer_number = max(1, int(layer_number))
        self.attention_type = attention_type
        self.attn_mask_type = attn_mask_type
        self.cp_comm_type = normalize_comm_type(cp_comm_type)
        _check_mask_type(attn_mask_type, f"layer {self.layer_number}")

        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout and float(dropout) > 0.0:
            raise ValueError(
                f"TaspDotProductAttention does not implement attention dropout (got p={dropout}); set "
                "attention_dropout=0.0 (Megatron-LM: --attention-dropout 0.0).")
        if getattr(config, "softmax_type", "vanilla") not in (None, "vanilla"):
            raise NotImplementedError(f"TaspDotProductAttention supports softmax_type='vanilla' only, "
                                      f"got {config.softmax_type!r}")
        if self._uses_window(config, layer_number):
            raise NotImplementedError("TaspDotProductAttention does not implement sliding-window attention "
                                      f"(config.window_size={config.window_size}).")

        self.hidden_size_per_attention_head = int(k_channels or config.kv_channels)
        self.hidden_size_per_attention_head_v = int(v_channels or self.hidden_size_per_attention_head)
        # Megatron's apply_query_key_layer_scaling divides QK^T by layer_number and multiplies it back inside
        # an fp32 softmax: a numerical trick with no effect on the result. TASP computes the softmax in fp32
        # (log-sum-exp), so the effective scale is simply softmax_scale or 1/sqrt(head dim).
        scale = softmax_scale if softmax_scale is not None else getattr(config, "softmax_scale", None)
        self.softmax_scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.hidden_size_per_attention_head)

        self.pg_collection = pg_collection
        self.cp_group = _cp_group_from(pg_collection)
        self.cp_size = self.cp_group.size() if self.cp_group is not None else 1
        want_cp = int(getattr(config, "context_parallel_size", 1) or 1)
        if want_cp > 1 and self.cp_size != want_cp:
            raise RuntimeError(
                f"config.context_parallel_size={want_cp} but the context-parallel group has {self.cp_size} ranks "
                "(initialize parallel_state or pass pg_collection with a 'cp' group)")
        if self.cp_size > 1 and attention_type != "self":
            raise NotImplementedError("TaspDotProductAttention supports self-attention only under context parallelism")

        options = default_options() if options is None else options
        self.options = options.replace(topology=self._load_topology(options.topology))
        # Attributes other Megatron code looks for on a core attention (QK-clip bookkeeping).
        self.current_max_attn_logits = None

    @staticmethod
    def _uses_window(config: Any, layer_number: int) -> bool:
        if getattr(config, "window_size", None) is None:
            return False
        try:
            from megatron.core.transformer.utils import is_layer_window_attention
        except ImportError:
            return True
        return bool(is_layer_window_attention(config.window_size, getattr(config, "window_attn_skip_freq", None),
                                              layer_number))

    def _load_topology(self, topology: Any) -> Any:
        """Load a topology path once and check it against the CP size (Topology objects are checked too)."""
        if topology is None:
            return None
        if isinstance(topology, str | bytes) or hasattr(topology, "__fspath__"):
            from megatron_tasp.topology import load_topology

            topology = load_topology(topology)
        check = getattr(topology, "check_world_size", None)
        if check is not None and self.cp_size > 1:
            check(self.cp_size)
        return topology

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written with TE core attention carry an `_extra_state` entry; it holds nothing TASP uses.
        state_dict.pop(f"{prefix}_extra_state", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention over the CP group; returns ``[s/cp, b, np * hn_v]``.

        ``attention_mask`` is ignored, as Transformer Engine does for causal/no_mask: the mask type decides.
        """
        extra = {k: v for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS}
        if extra:
            raise TypeError(f"TaspDotProductAttention.forward got unsupported arguments: {sorted(extra)}")
        if attention_bias is not None:
            raise NotImplementedError("TaspDotProductAttention does not support attention_bias")
        mask = _check_mask_type(attn_mask_type if attn_mask_type is not None else self.attn_mask_type,
                                f"forward of layer {self.layer_number}")
        if packed_seq_params is not None:
            return self._forward_thd(query, key, value, mask, packed_seq_params)
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(f"expected sbhd tensors [s, b, heads, dim]; got query {tuple(query.shape)}, "
                             f"key {tuple(key.shape)}, value {tuple(value.shape)}")
        if mask == "causal_bottom_right" and query.shape[0] != key.shape[0]:
            raise NotImplementedError("causal_bottom_right with different query and key lengths is not supported")

        query, key, value, dv = _pad_head_dims(query, key, value)
        d = query.shape[-1]

        # cp_group None (CP 1 without a group) is plain attention in tasp_attention.
        out = _resolve_tasp_attention()(query, key, value, self.cp_group, causal=mask != "no_mask",
                                        softmax_scale=self.softmax_scale, options=self.options)
        if dv < d:
            out = out[..., :dv]
        s, b = out.shape[0], out.shape[1]
        return out.reshape(s, b, -1)

    def _forward_thd(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: str,
                     packed_seq_params: Any) -> torch.Tensor:
        """Packed documents (THD): ``[t, h, d]`` (or ``[t, 1, h, d]``) in, ``[t, h * hn_v]`` out, as TE returns.

        Megatron's attention reshapes this to ``[t, 1, h * hn_v]``. Tokens are in the per-document zigzag
        layout of ``megatron_tasp.thd.partition_index`` (Transformer Engine's THD convention).
        """
        if self.attention_type != "self":
            raise NotImplementedError(f"TaspDotProductAttention supports packed (THD) self-attention only, got "
                                      f"attention_type={self.attention_type!r}: use Transformer Engine's attention "
                                      "for packed cross-attention")
        cu_seqlens, cu_seqlens_padded = thd_host_boundaries(packed_seq_params, self.cp_size, self.layer_number)
        query, key, value = (_as_thd(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value")))
        query, key, value, dv = _pad_head_dims(query, key, value)
        # cp_group None (CP 1 without a group) is packed attention on this rank's tokens in tasp_attention.
        out = _resolve_tasp_attention()(query, key, value, self.cp_group, causal=mask != "no_mask",
                                        cu_seqlens_padded=cu_seqlens_padded, cu_seqlens=cu_seqlens,
                                        softmax_scale=self.softmax_scale, options=self.options)
        if out.shape[-1] != dv:
            out = out[..., :dv]
        return out.reshape(out.shape[0], -1)

    def extra_repr(self) -> str:
        o = self.options
        return (f"layer={self.layer_number}, cp={self.cp_size}, mask={_mask_name(self.attn_mask_type)}, "
                f"scale={self.softmax_scale:.4g}, num_rings={o.num_rings}, transport={o.transport}, "
                f"kernel={o.kernel}, chunks={o.chunks}, keep_kv={o.keep_kv}")


__all__ = ["TASP_COMM_TYPE", "TaspDotProductAttention", "is_tasp_comm_type", "normalize_comm_type", "thd_cu_seqlens",
           "thd_host_boundaries"]
