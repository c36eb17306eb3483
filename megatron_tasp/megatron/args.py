"""Command-line flags for choosing the context-parallel backend, and fail-closed validation.

``add_tasp_args(parser)`` adds::

    --context-parallel-backend {ring,p2p,a2a,all_gather,a2a+p2p,tasp}   (default: keep --cp-comm-type)
    --tasp-topology FILE       topology YAML (or a shipped preset name)
    --tasp-num-rings {N|auto}  rings per step (default: the most the topology offers)
    --tasp-transport {a2a,p2p,auto}
    --tasp-kernel NAME         attention kernel backend for TASP

``validate_tasp_args(args)`` maps the backend onto ``args.cp_comm_type`` (a list, as Megatron-LM keeps it;
"ring" means "p2p"), sets ``args.tasp_enabled`` (select the TASP spec when True) and rejects
configurations that would silently do the wrong thing. Works with Megatron-LM's parsed args and with any
namespace that carries the same attribute names (missing ones take Megatron's defaults).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from megatron_tasp.options import parse_keep_kv as _parse_keep_kv

BACKENDS = ("ring", "p2p", "a2a", "all_gather", "a2a+p2p", "tasp")
TRANSPORTS = ("a2a", "p2p", "symm", "auto")
_BACKEND_TO_COMM = {"ring": "p2p"}


class TaspArgumentError(ValueError):
    """An invalid or unsafe combination of context-parallel arguments."""


def _warn(msg: str) -> None:
    print(f"[megatron-tasp] WARNING: {msg}", file=sys.stderr)


def _normalize_comm(value: str, flag: str) -> str:
    v = str(value).strip().lower()
    if v in ("allgather", "all-gather"):
        _warn(f"{flag} '{value}' is spelled 'all_gather' (Transformer Engine rejects 'allgather'); "
              "using 'all_gather'")
        return "all_gather"
    return v


def _backend_type(value: str) -> str:
    v = _normalize_comm(value, "--context-parallel-backend")
    if v not in BACKENDS:
        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(BACKENDS)})")
    return v


def parse_chunks(value: Any) -> int | str | None:
    """``None`` -> None (default 1), "auto" -> "auto", an integer (string) >= 1 -> int."""
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"--tasp-chunks must be a positive integer or 'auto', got {value!r}") \
            from None
    if n < 1 or isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"--tasp-chunks must be a positive integer or 'auto', got {value!r}")
    return n


def parse_keep_kv(value: Any) -> bool | str | None:
    """``None`` -> None (the engine's default, 'auto'); otherwise ``megatron_tasp.options.parse_keep_kv``."""
    if value is None:
        return None
    try:
        return _parse_keep_kv(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tasp-keep-kv must be auto, 1 or 0, got {value!r}") from None


def parse_num_rings(value: Any) -> int | str | None:
    """``None``/"auto" -> "auto"-like value; an integer string -> int >= 1."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--tasp-num-rings must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--tasp-num-rings must be >= 1, got {n}")
    return n


def add_tasp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the context-parallel backend flags (skipped if the parser already has them); return parser."""
    if "--context-parallel-backend" in getattr(parser, "_option_string_actions", {}):
        return parser
    group = parser.add_argument_group(title="context-parallel backend (megatron-tasp)")
    group.add_argument("--context-parallel-backend", type=_backend_type, default=None, metavar="{" +
                       ",".join(BACKENDS) + "}",
                       help="Context-parallel attention backend. ring/p2p, a2a, all_gather and a2a+p2p set "
                            "--cp-comm-type for Transformer Engine; tasp selects TASP (topology-aware multi-ring) "
                            "core attention from megatron-tasp. Default: keep --cp-comm-type.")
    group.add_argument("--tasp-topology", type=str, default=None, metavar="FILE",
                       help="TASP topology YAML file or shipped preset name; its GPU count must equal "
                            "--context-parallel-size.")
    group.add_argument("--tasp-num-rings", type=parse_num_rings, default=None, metavar="{N,auto}",
                       help="Number of TASP rings per step (default/auto: the most the topology offers; "
                            "1 = zigzag ring attention).")
    group.add_argument("--tasp-transport", type=str, choices=TRANSPORTS, default=None,
                       help="How TASP moves KV pieces: a2a (all_to_all_single), p2p (batched isend/irecv), "
                            "symm (copy-engine pushes into symmetric memory; one NVLink node) or auto.")
    group.add_argument("--tasp-chunks", type=parse_chunks, default=None, metavar="{N,auto}",
                       help="Messages per KV piece and step (default 1): with N > 1 each piece's kernels start "
                            "as soon as its first chunk lands, at the cost of N times the kernel launches.")
    group.add_argument("--tasp-keep-kv", type=parse_keep_kv, default=None, metavar="{auto,1,0}",
                       help="Keep the KV pieces received in the forward for the backward (1: no KV exchange in "
                            "the backward, every dK/dV hop hidden; costs (CP-1) x the local K/V per layer until "
                            "its backward), exchange them again (0), or auto (default: keep up to 64 MiB per "
                            "layer call, MEGATRON_TASP_KEEP_KV_MIB; never with symm).")
    group.add_argument("--tasp-kernel", type=str, default=None,
                       help="Attention kernel backend used by TASP (default: chosen at run time).")
    return parser


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _attention_backend_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "name", value)).lower()


def _device_capability() -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def validate_tasp_args(args: Any, *, device_capability: tuple[int, int] | None | str = "detect") -> Any:
    """Apply ``--context-parallel-backend`` to ``args.cp_comm_type`` and check the CP setup; return args.

    Raises TaspArgumentError on: TASP with ``--attention-backend local``; a topology whose GPU count differs
    from ``--context-parallel-size``; ``seq_length`` not divisible by ``2 * cp``; CP > 1 with TASP on a
    pre-Blackwell GPU (e.g. Hopper) without ``CUDA_DEVICE_MAX_CONNECTIONS=1``; ``a2a+p2p`` without
    ``--hierarchical-context-parallel-sizes`` (Transformer Engine would silently run without CP); TASP with
    attention dropout, packed/THD sequences or dynamic (hybrid) CP; conflicting flags.
    ``device_capability`` overrides GPU detection (tests); None means "no GPU".
    """
    cp = int(getattr(args, "context_parallel_size", 1) or 1)
    comm = [_normalize_comm(c, "--cp-comm-type") for c in _as_list(getattr(args, "cp_comm_type", None))]
    backend = getattr(args, "context_parallel_backend", None)
    if backend is not None:
        try:
            backend = _backend_type(backend)
        except argparse.ArgumentTypeError as exc:
            raise TaspArgumentError(f"--context-parallel-backend: {exc}") from None
        args.context_parallel_backend = backend
        mapped = _BACKEND_TO_COMM.get(backend, backend)
        if len(comm) > 1:
            if backend != "tasp" or "tasp" not in comm:
                raise TaspArgumentError(
                    f"--context-parallel-backend {backend} conflicts with the per-layer --cp-comm-type {comm}; "
                    "give one of them (a per-layer list may mix 'tasp' with TE types under "
                    "--context-parallel-backend tasp)")
        else:
            comm = [mapped]
    if comm or hasattr(args, "cp_comm_type"):
        args.cp_comm_type = comm or ["p2p"]
    uses_tasp = "tasp" in comm
    args.tasp_enabled = uses_tasp

    if "a2a+p2p" in comm:
        hier = getattr(args, "hierarchical_context_parallel_sizes", None)
        if not hier:
            raise TaspArgumentError(
                "cp_comm_type a2a+p2p needs --hierarchical-context-parallel-sizes (e.g. 2 4); without it "
                "Transformer Engine receives no CP group and silently trains WITHOUT context parallelism")
        if math.prod(int(h) for h in hier) != cp:
            raise TaspArgumentError(f"--hierarchical-context-parallel-sizes {list(hier)} multiply to "
                                    f"{math.prod(int(h) for h in hier)}, not --context-parallel-size {cp}")

    seq = getattr(args, "seq_length", None)
    if cp > 1 and seq is not None and int(seq) % (2 * cp) != 0:
        raise TaspArgumentError(f"--seq-length {seq} must be a multiple of 2 * --context-parallel-size = {2 * cp} "
                                "(Megatron's zigzag split gives each CP rank two equal chunks)")

    if not uses_tasp:
        return args

    if _attention_backend_name(getattr(args, "attention_backend", None)) == "local":
        raise TaspArgumentError(
            "TASP cannot be combined with --attention-backend local: Megatron-LM then overwrites the core "
            "attention with its local DotProductAttention (no CP support). Use --attention-backend auto "
            "(or flash/fused) with --context-parallel-backend tasp")
    dropout = getattr(args, "attention_dropout", 0.0)
    if dropout and float(dropout) > 0.0:
        raise TaspArgumentError(f"TASP attention has no attention dropout; pass --attention-dropout 0.0 "
                                f"(got {dropout}; Megatron-LM's default is 0.1)")
    if getattr(args, "hybrid_context_parallel", False):
        raise TaspArgumentError("TASP does not support --hybrid-context-parallel (dynamic per-batch CP groups)")
    if getattr(args, "sft", False) or getattr(args, "dataloader_inter_document_masking", False):
        raise TaspArgumentError("TASP does not support packed (THD) sequences yet: --sft and "
                                "--dataloader-inter-document-masking build packed batches")

    try:
        num_rings = parse_num_rings(getattr(args, "tasp_num_rings", None))
    except argparse.ArgumentTypeError as exc:
        raise TaspArgumentError(str(exc)) from None
    args.tasp_num_rings = num_rings
    try:
        args.tasp_chunks = parse_chunks(getattr(args, "tasp_chunks", None))
        args.tasp_keep_kv = parse_keep_kv(getattr(args, "tasp_keep_kv", None))
    except argparse.ArgumentTypeError as exc:
        raise TaspArgumentError(str(exc)) from None
    transport = getattr(args, "tasp_transport", None)
    if transport is not None and transport not in TRANSPORTS:
        raise TaspArgumentError(f"--tasp-transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "symm" and args.tasp_keep_kv is True:
        raise TaspArgumentError("--tasp-keep-kv 1 needs per-call KV buffers, but --tasp-transport symm moves pieces "
                                "through two persistent buffers shared by every layer: use --tasp-keep-kv auto or 0 "
                                "with symm, or --tasp-transport a2a")

    topo_path = getattr(args, "tasp_topology", None)
    max_k = None
    if topo_path:
        from megatron_tasp.topology import load_topology

        topology = load_topology(topo_path)
        if topology.world_size != cp:
            raise TaspArgumentError(
                f"--tasp-topology {topo_path} describes {topology.world_size} GPUs "
                f"({topology.nodes} node(s) x {topology.gpus_per_node}) but --context-parallel-size is {cp}")
        max_k = topology.max_rings() if cp > 1 else None
    elif cp > 1:
        from megatron_tasp.topology import max_rings

        max_k = max_rings(cp)
    if isinstance(num_rings, int) and max_k is not None and num_rings > max_k:
        raise TaspArgumentError(f"--tasp-num-rings {num_rings} exceeds the {max_k} orthogonal rings available "
                                f"for {cp} CP ranks")

    if cp > 1:
        cap = _device_capability() if device_capability == "detect" else device_capability
        if cap is not None and cap[0] < 10 and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
            raise TaspArgumentError(
                "context parallelism on a pre-Blackwell GPU (e.g. Hopper, sm_90) needs "
                "CUDA_DEVICE_MAX_CONNECTIONS=1 so communication is issued before the attention kernel it "
                "overlaps with; export CUDA_DEVICE_MAX_CONNECTIONS=1")
    return args


def tasp_options_from_args(args: Any) -> dict[str, Any]:
    """The ``config.tasp_*`` attributes TaspDotProductAttention reads, taken from parsed args."""
    transport = getattr(args, "tasp_transport", None)
    return {
        "tasp_num_rings": getattr(args, "tasp_num_rings", None),
        "tasp_topology": getattr(args, "tasp_topology", None),
        "tasp_transport": None if transport == "auto" else transport,
        "tasp_kernel": getattr(args, "tasp_kernel", None),
        "tasp_chunks": getattr(args, "tasp_chunks", None),
        "tasp_keep_kv": getattr(args, "tasp_keep_kv", None),
    }


__all__ = ["BACKENDS", "TRANSPORTS", "TaspArgumentError", "add_tasp_args", "parse_chunks", "parse_keep_kv",
           "parse_num_rings",
           "tasp_options_from_args", "validate_tasp_args"]
