"""Command-line flags for choosing the context-parallel backend, and fail-closed validation.

``add_tasp_args(parser)`` adds ``--context-parallel-backend {ring,p2p,a2a,all_gather,a2a+p2p,tasp}`` (default:
keep ``--cp-comm-type``) and one ``--tasp-*`` flag per user-facing field of
:class:`megatron_tasp.options.TaspOptions` (:data:`TASP_FLAGS`). The flags hold no value rules of their own:
each argparse ``type=`` delegates to ``megatron_tasp.options.parse_options``.

``validate_tasp_args(args)`` maps the backend onto ``args.cp_comm_type`` (a list, as Megatron-LM keeps it;
"ring" means "p2p"), sets ``args.tasp_enabled`` (select the TASP spec when True), builds ``args.tasp_options``
(a ``TaspOptions``: defaults < ``MEGATRON_TASP_*`` environment < flags) and rejects configurations that would
silently do the wrong thing. Works with Megatron-LM's parsed args and with any namespace that carries the
same attribute names (missing ones take Megatron's defaults).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from megatron_tasp.options import ENV_VARS, TaspOptionError, TaspOptions, parse_options

BACKENDS = ("ring", "p2p", "a2a", "all_gather", "a2a+p2p", "tasp")
_BACKEND_TO_COMM = {"ring": "p2p"}

# flag -> (TaspOptions field, metavar, help)
TASP_FLAGS: dict[str, tuple[str, str, str]] = {
    "--tasp-topology": (
        "topology", "FILE",
        "TASP topology YAML file or shipped preset name; its GPU count must equal --context-parallel-size."),
    "--tasp-num-rings": (
        "num_rings", "{N,auto}",
        "Number of TASP rings per step (default: the most the topology offers; 1 = zigzag ring attention; "
        "auto = the cost model's choice)."),
    "--tasp-transport": (
        "transport", "{a2a,p2p,symm,auto}",
        "How TASP moves KV pieces: a2a (all_to_all_single), p2p (batched isend/irecv), symm (copy-engine "
        "pushes into symmetric memory; one NVLink node) or auto (default: a2a on one node, p2p across nodes)."),
    "--tasp-kernel": (
        "kernel", "NAME",
        "Block-attention kernel used by TASP (default/auto: chosen for the device at run time)."),
    "--tasp-chunks": (
        "chunks", "{N,auto}",
        "Messages per KV piece and step (default 1): with N > 1 each piece's kernels start as soon as its "
        "first chunk lands, at the cost of N times the kernel launches."),
    "--tasp-keep-kv": (
        "keep_kv", "{auto,1,0}",
        "Keep the KV pieces received in the forward for the backward (1: no KV exchange in the backward; costs "
        "(CP-1) x the local K/V per layer until its backward), exchange them again (0), or auto (default: keep "
        "up to --tasp-keep-kv-mib per layer call; never with symm)."),
    "--tasp-keep-kv-mib": (
        "keep_kv_cap_mib", "MIB",
        "What --tasp-keep-kv auto keeps per layer call at most, in MiB (default 64; environment: "
        f"{next(var for var, name in ENV_VARS.items() if name == 'keep_kv_cap_mib')})."),
    "--tasp-dkv-dtype": (
        "dkv_dtype", "{fp32,input}",
        "dtype of the travelling dK/dV accumulator: fp32 (default) or input (the input dtype; half the "
        "backward traffic, less exact)."),
    "--tasp-cuda-graphs": (
        "cuda_graphs", "{1,0}",
        "Replay each TASP call's forward and backward from CUDA graphs captured on its second call (1) or launch "
        "them (0, default). For short sequences, where the host's launches take longer than the GPU work; "
        "costs a copy of the inputs and outputs per call and one graph memory pool per shape. Not needed "
        "with Megatron-LM's own CUDA graphs, which capture TASP as part of each layer."),
    "--tasp-packed-dense-rows": (
        "packed_dense_rows", "{N,none}",
        "Packed documents (--sft, THD): in causal attention, run each document of at least N rows of a rank's "
        "own block on the dense kernel (cuDNN on Hopper), padded to one of 8 sizes per power of two, instead of "
        "the varlen launch (default none). Measured against --tasp-packed-kernel flash: faster for long documents "
        "at CP=1 and at 128K tokens per sequence at CP=2; the first calls plan each new padded shape."),
    "--tasp-packed-kernel": (
        "packed_kernel", "{auto,cudnn,flash}",
        "Packed documents (--sft, THD) on CUDA: the varlen attention kernel. cudnn: cuDNN's fused attention over "
        "ragged tensors (Hopper or newer; needs pip install nvidia-cudnn-frontend); flash: FlashAttention-2's "
        "varlen op; auto (default): cuDNN where it can serve, else FlashAttention-2."),
    "--tasp-timeout-s": (
        "timeout_s", "SECONDS",
        "Seconds a CPU (gloo) exchange waits for a peer before raising (default 300)."),
}

logger = logging.getLogger("megatron_tasp")


class TaspArgumentError(ValueError):
    """An invalid or unsafe combination of context-parallel arguments."""


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _normalize_comm(value: str, flag: str) -> str:
    v = str(value).strip().lower()
    if v in ("allgather", "all-gather"):
        logger.warning("%s '%s' is spelled 'all_gather' (Transformer Engine rejects 'allgather'); using "
                       "'all_gather'", flag, value)
        return "all_gather"
    return v


def _backend_type(value: str) -> str:
    v = _normalize_comm(value, "--context-parallel-backend")
    if v not in BACKENDS:
        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(BACKENDS)})")
    return v


def option_type(field: str) -> Callable[[Any], Any]:
    """An argparse ``type=`` for one TaspOptions field: the options module's rules, nothing of its own.

    Returns the normalised value ("3" -> 3, "off" -> False); a word that normalises to "not set" (auto)
    is kept as given, so an explicit ``auto`` still wins over the environment in :func:`validate_tasp_args`.
    """

    def parse(value: Any) -> Any:
        try:
            parsed = getattr(parse_options({field: value}, use_env=False), field)
        except TaspOptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if parsed is None and value is not None:
            return str(value).strip().lower()
        return parsed

    parse.__name__ = f"tasp_{field}"
    return parse


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
    for flag, (field, metavar, text) in TASP_FLAGS.items():
        group.add_argument(flag, type=option_type(field), default=None, metavar=metavar, help=text)
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


def tasp_options_from_args(args: Any) -> TaspOptions:
    """``args.tasp_options`` when :func:`validate_tasp_args` built it, else the options the ``--tasp-*``
    values on ``args`` give (defaults < environment < flags). Raises TaspArgumentError on a bad value."""
    built = getattr(args, "tasp_options", None)
    if isinstance(built, TaspOptions):
        return built
    given = {field: getattr(args, _dest(flag), None) for flag, (field, _, _) in TASP_FLAGS.items()}
    given["packed_split"] = packed_split_of(args)  # a fact of the data flags, not a flag of its own
    flags = " ".join(flag for flag, (field, _, _) in TASP_FLAGS.items() if given[field] is not None)
    try:
        return parse_options(given, where=f"flags {flags}" if flags else "")
    except TaspOptionError as exc:
        raise TaspArgumentError(str(exc)) from None


def validate_tasp_args(args: Any, *, device_capability: tuple[int, int] | None | str = "detect") -> Any:
    """Apply ``--context-parallel-backend`` to ``args.cp_comm_type``, check the CP setup and, when TASP is
    selected, set ``args.tasp_options``; return args.

    Raises TaspArgumentError on: TASP with ``--attention-backend local``; a topology whose GPU count differs
    from ``--context-parallel-size``; ``seq_length`` not divisible by ``2 * cp``; CP > 1 with TASP on a
    pre-Blackwell GPU (e.g. Hopper) without ``CUDA_DEVICE_MAX_CONNECTIONS=1``; ``a2a+p2p`` without
    ``--hierarchical-context-parallel-sizes`` (Transformer Engine would silently run without CP); TASP with
    attention dropout or dynamic (hybrid) CP; a bad ``--tasp-*`` value; conflicting flags. Packed (THD)
    batches are served: ``--sft`` (every document padded and split over the CP ranks) and
    ``--dataloader-inter-document-masking`` (the sequence split as a whole; ``options.packed_split``).
    Tensor, sequence, pipeline and expert parallelism, activation recomputation and the distributed
    optimizer compose with TASP and are left as they are. With TASP on every layer the dataloader's S x S
    attention mask (never read by TASP) is switched off. ``device_capability`` overrides GPU detection
    (tests); None means "no GPU".
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

    _check_tasp_compat(args)
    options = tasp_options_from_args(args)
    _check_topology(options, cp)
    args.tasp_options = options
    for flag, (field, _, _) in TASP_FLAGS.items():  # the effective values, for logs and checkpoints' args
        setattr(args, _dest(flag), getattr(options, field))
    _skip_dataloader_mask(args, comm)

    if cp > 1:
        cap = _device_capability() if device_capability == "detect" else device_capability
        if cap is not None and cap[0] < 10 and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
            raise TaspArgumentError(
                "context parallelism on a pre-Blackwell GPU (e.g. Hopper, sm_90) needs "
                "CUDA_DEVICE_MAX_CONNECTIONS=1 so communication is issued before the attention kernel it "
                "overlaps with; export CUDA_DEVICE_MAX_CONNECTIONS=1")
    return args


def _check_tasp_compat(args: Any) -> None:
    """Reject the Megatron features TASP attention does not implement."""
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
    cp = int(getattr(args, "context_parallel_size", 1) or 1)
    pos = getattr(args, "position_embedding_type", "learned_absolute")
    if cp > 1 and packed_split_of(args) == "sequence" and pos in ("rope", "yarn", "mrope"):
        raise TaspArgumentError(
            f"--dataloader-inter-document-masking without --sft at --context-parallel-size {cp} splits the packed "
            f"sequence as a whole, but Megatron-Core's RoPE for packed batches (--position-embedding-type {pos}) "
            "rotates per document split over the CP ranks and fails; add --sft (per-document split) or use "
            "--position-embedding-type learned_absolute")


def packed_split_of(args: Any) -> str:
    """How Megatron-LM splits packed (THD) batches over CP ranks: 'sequence' with
    --dataloader-inter-document-masking without --sft (the sequence as a whole, documents of any length:
    ``use_per_sequence_balancing``), else 'document' (--sft pads every document to 2·CP and splits each)."""
    if getattr(args, "dataloader_inter_document_masking", False) and not getattr(args, "sft", False):
        return "sequence"
    return "document"


def _check_topology(options: TaspOptions, cp: int) -> None:
    """The topology's GPU count must be the CP size; an explicit ring count must fit in it."""
    max_k = None
    if options.topology is not None:
        from megatron_tasp.topology import load_topology

        topology = options.topology if not isinstance(options.topology, str) else load_topology(options.topology)
        if topology.world_size != cp:
            raise TaspArgumentError(
                f"--tasp-topology {options.topology} describes {topology.world_size} GPUs "
                f"({topology.nodes} node(s) x {topology.gpus_per_node}) but --context-parallel-size is {cp}")
        max_k = topology.max_rings() if cp > 1 else None
    elif cp > 1:
        from megatron_tasp.topology import max_rings

        max_k = max_rings(cp)
    if isinstance(options.num_rings, int) and max_k is not None and options.num_rings > max_k:
        raise TaspArgumentError(f"--tasp-num-rings {options.num_rings} exceeds the {max_k} orthogonal rings "
                                f"available for {cp} CP ranks")


def _skip_dataloader_mask(args: Any, comm: list[str]) -> None:
    """With TASP on every layer nothing reads the dataloader's [b, 1, s, s] mask: do not build it."""
    if getattr(args, "create_attention_mask_in_dataloader", False) and all(c == "tasp" for c in comm):
        args.create_attention_mask_in_dataloader = False
        logger.info("TASP attention never reads the attention mask (the mask type decides): "
                    "create_attention_mask_in_dataloader set to False (saves an S x S mask per sample)")



def megatron_lm_options() -> TaspOptions | None:
    """The TaspOptions of a Megatron-LM run: ``get_args().tasp_options`` when ``validate_tasp_args`` built it,
    else the parsed ``--tasp-*`` flags (never silently the defaults); None outside such a run
    (megatron.training not loaded, no global args, or args without the TASP flags).
    Never imports megatron.training itself."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    if global_vars is None:
        return None
    try:
        args = global_vars.get_args()
    except Exception:  # noqa: BLE001 - Megatron asserts when the global args are not set
        return None
    if isinstance(getattr(args, "tasp_options", None), TaspOptions):
        return args.tasp_options
    if any(hasattr(args, f"tasp_{name}") for name in ("num_rings", "topology", "transport", "kernel", "chunks")):
        return tasp_options_from_args(args)  # the --tasp-* flags were parsed but not validated: honour them
    return None


__all__ = ["BACKENDS", "TASP_FLAGS", "TaspArgumentError", "add_tasp_args", "megatron_lm_options", "option_type",
           "packed_split_of", "tasp_options_from_args", "validate_tasp_args"]
