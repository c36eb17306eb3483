"""``TaspOptions``: every knob of TASP attention in one frozen object, and the one parser behind every entry
point (``tasp_attention``, the Megatron flags, recipes, bench, scripts). Pure Python, no torch.

Precedence, the same everywhere: built-in defaults < environment variables < what the caller gives
(keyword arguments, ``--tasp-*`` flags, a recipe's ``parallel`` section). A ``TaspOptions`` object passed
explicitly is taken as it is. The environment is read in this module only, once per process
(:func:`env_options`; :func:`reload_env` re-reads it), never on the attention hot path.

Environment variables (each overrides the default of one field):

====================================  ======================  ===================================================
variable                              field                   values
====================================  ======================  ===================================================
``MEGATRON_TASP_NUM_RINGS``           ``num_rings``           N or ``auto``
``MEGATRON_TASP_TOPOLOGY``            ``topology``            preset name or YAML path
``MEGATRON_TASP_TRANSPORT``           ``transport``           ``a2a``, ``p2p``, ``symm`` or ``auto``
``MEGATRON_TASP_KERNEL``              ``kernel``              a block-kernel name or ``auto``
``MEGATRON_TASP_CHUNKS``              ``chunks``              N or ``auto``
``MEGATRON_TASP_KEEP_KV``             ``keep_kv``             ``auto``, 1/0, true/false, on/off
``MEGATRON_TASP_KEEP_KV_MIB``         ``keep_kv_cap_mib``     MiB 'auto' keeps per call (default 64)
``MEGATRON_TASP_DKV_DTYPE``           ``dkv_dtype``           ``fp32`` (default) or ``input``
``MEGATRON_TASP_TIMEOUT_S``           ``timeout_s``           seconds a CPU exchange waits (default 300)
``MEGATRON_TASP_FUSED_MERGE``         ``fused_merge``         1 (default) or 0: the torch merge instead of Triton
``MEGATRON_TASP_DIRECT_COLLECTIVES``  ``direct_collectives``  1 (default) or 0: public all_to_all_single
``MEGATRON_TASP_CALIBRATION``         ``calibration``         cost-model calibration JSON for the 'auto' choices
``MEGATRON_TASP_AUTO_PROBE``          ``auto_probe``          1: time candidate ring counts once per shape
``MEGATRON_TASP_HOSTS``               ``hosts``               comma-separated host of every CP rank (emulation)
``MEGATRON_TASP_PACKED_DENSE_ROWS``   ``packed_dense_rows``   N: documents of >= N rows on the dense kernel
``MEGATRON_TASP_PACKED_KERNEL``       ``packed_kernel``       ``auto``, ``cudnn`` or ``flash``: packed blocks
``MEGATRON_TASP_CUDA_GRAPHS``         ``cuda_graphs``         1 or 0 (default): replay calls from CUDA graphs
====================================  ======================  ===================================================

One name per concept: ``kernel`` is the block-attention kernel (cudnn, flash, ...); ``transport`` is how
pieces move; "backend" is only Megatron's ``--context-parallel-backend`` (tasp or one of TE's rings).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KEEP_KV_AUTO_MIB = 64.0  # default cap of what keep_kv='auto' keeps per call
TRANSPORTS = ("a2a", "p2p", "symm")
DKV_DTYPES = ("fp32", "input")
PACKED_SPLITS = ("document", "sequence")
PACKED_KERNELS = ("auto", "cudnn", "flash")
ENV_PREFIX = "MEGATRON_TASP_"

_BOOL_WORDS: dict[str, bool] = {"1": True, "true": True, "yes": True, "on": True,
                                "0": False, "false": False, "no": False, "off": False}


class TaspOptionError(ValueError):
    """An option value TASP cannot take; the message names the option and the accepted values."""


def _positive_int(name: str, value: Any, words: dict[str, Any], accepted: str) -> Any:
    """A positive int from an int or its digits, or the value a word (``words``, lower case) stands for;
    anything else raises naming ``accepted``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in words:
            return words[text]
        if not text.isdigit():
            raise TaspOptionError(f"{name} must be {accepted}, got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaspOptionError(f"{name} must be {accepted}, got {value!r}")
    return value


def _positive_int_or_auto(name: str, value: Any, *, allow_none: bool) -> int | str | None:
    if value is None:
        if allow_none:
            return None
        raise TaspOptionError(f"{name} must be a positive integer or 'auto', got None")
    words: dict[str, Any] = {"auto": "auto", **({"": None, "none": None, "max": None} if allow_none else {})}
    return _positive_int(name, value, words, "a positive integer or 'auto'")


def parse_bool(name: str, value: Any) -> bool:
    """A bool from a bool or a word (1/0, true/false, yes/no, on/off; any case)."""
    if isinstance(value, bool):
        return value
    word = _BOOL_WORDS.get(str(value).strip().lower()) if isinstance(value, (str, int)) else None
    if word is None:
        raise TaspOptionError(f"{name} must be true or false (1/0, on/off), got {value!r}")
    return word


def parse_keep_kv(value: Any) -> bool | str:
    """True, False or 'auto' from a bool or a word (auto, 1/0, true/false, yes/no, on/off; any case)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool("keep_kv", value)
    except TaspOptionError:
        raise TaspOptionError(f"keep_kv must be True, False or 'auto' (or 1/0, true/false, on/off), "
                              f"got {value!r}") from None


def _positive_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TaspOptionError(f"{name} must be a positive number, got {value!r}") from None
    if isinstance(value, bool) or not out > 0:
        raise TaspOptionError(f"{name} must be a positive number, got {value!r}")
    return out


def _positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    return _positive_int(name, value, {"": None, "none": None, "off": None}, "a positive integer or None")


def _choice(name: str, value: Any, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    """``value`` as one of ``choices`` (case and surrounding blanks ignored; ``aliases`` map other spellings);
    anything else raises naming them."""
    text = str(value).strip().lower()
    text = (aliases or {}).get(text, text)
    if text not in choices:
        named = ", ".join(f"'{c}'" for c in choices[:-1]) + f" or '{choices[-1]}'"
        raise TaspOptionError(f"{name} must be {named}, got {value!r}")
    return text


def _choice_or_auto(name: str, value: Any, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if text not in choices:
        raise TaspOptionError(f"{name} must be one of {', '.join(choices)} or 'auto', got {value!r}")
    return text


@dataclass(frozen=True)
class TaspOptions:
    """How TASP attention runs. Every field has a default that serves a single node.

    num_rings: rings per step (None: the most the topology offers; 1: zigzag ring attention; 'auto':
        the cost model's choice).
    topology: a ``Topology``, a shipped preset name or a YAML path (None: an all-to-all single node).
    transport: 'a2a', 'p2p' or 'symm' (None: a2a on one node, p2p across nodes).
    kernel: block-attention kernel name (None: chosen for the device; ``megatron_tasp.kernels``).
    chunks: messages per piece and step (1; 'auto': the cost model's choice).
    keep_kv: keep the forward's received KV pieces for the backward (True/False/'auto').
    keep_kv_cap_mib: what 'auto' keeps per call at most.
    dkv_dtype: the travelling dK/dV accumulator: 'fp32' or 'input' (the input dtype).
    timeout_s: seconds a CPU (gloo) exchange waits for a peer before raising.
    fused_merge: the one-kernel Triton merge on CUDA (False: the torch merge).
    direct_collectives: post all-to-alls on the process group's backend object (False: public API).
    calibration: cost-model calibration file for the 'auto' choices (None: the shipped constants).
    auto_probe: with num_rings='auto', time the candidates once per shape on the real group.
    hosts: the host of every CP rank in group order (None: gathered from the processes); set it to
        emulate several nodes on one machine.
    packed_split: how packed documents were split over the CP ranks: 'document' (every document padded to a
        multiple of 2·CP and cut into 2·CP chunks; Megatron-LM's ``--sft``, Transformer Engine's THD) or
        'sequence' (the packed sequence as a whole in 2·CP chunks, documents of any length; Megatron-LM's
        ``--dataloader-inter-document-masking`` without ``--sft``).
    packed_dense_rows: packed documents on CUDA run as one varlen launch per block (``packed_kernel``); in causal
        calls, a document of at least this many rows in the own block (queries and keys the same rows) runs as
        its own call on the dense kernel (``kernel``, e.g. cudnn) instead, its rows zero-padded up to one of 8
        sizes per power of two (exact under the causal mask). None (default): every segment in the varlen
        launch. cuDNN outruns FlashAttention-2 by ~1.4x on a large document on Hopper but builds an execution
        plan for every new shape; the padding bounds the shapes, so with document lengths that change every call
        the plans are built during the first calls only. Measured on one H200 with 1024: CP=1 1.23-1.42x faster
        at 32K-128K tokens; CP=2 per rank 10% faster at 128K and 3% slower at 32K-64K (only the own block is
        served; the padded copies cost about what cuDNN saves there). Measured against packed_kernel='flash';
        cuDNN's ragged varlen form serves such documents without the padded copies.
    packed_kernel: the varlen kernel of packed-document blocks on CUDA. 'cudnn': cuDNN's fused attention over
        ragged tensors (Hopper or newer; needs NVIDIA's cuDNN frontend package, ``pip install
        nvidia-cudnn-frontend``); 'flash': torch's FlashAttention-2 varlen op; 'auto' (default): cuDNN where it
        can serve (the package installed, Hopper, fp16/bf16, head dim <= 128), else FlashAttention-2. Measured on
        one H200 (32K-128K tokens, GQA 32/8, fwd+bwd): cuDNN's takes 0.64-0.65x FlashAttention-2's time for the
        whole packed sequence on one GPU and 0.66-0.72x per CP=2 rank (docs/PERFORMANCE.md, packed item 12).
    cuda_graphs: (experimental) replay the forward and backward of every dense call with CP > 1 from CUDA
        graphs, captured on a signature's second call (``megatron_tasp.engine.graphed``): for short sequences,
        where launching ~30 kernels per call costs more host time than the GPU work takes. Costs a copy of the
        inputs in and of the outputs out per call, and per signature one graph memory pool (a call's workspace
        plus static copies of its inputs, outputs and kept KV). Packed-document calls, calls under
        inference_mode and calls made while a stream is being captured (Megatron-LM's own graphs) run eagerly;
        a capture that fails on any rank leaves that signature eager on every rank.
    """

    num_rings: int | str | None = None
    topology: Any = None
    transport: str | None = None
    kernel: str | None = None
    chunks: int | str = 1
    keep_kv: bool | str = "auto"
    keep_kv_cap_mib: float = KEEP_KV_AUTO_MIB
    dkv_dtype: str = "fp32"
    timeout_s: float = 300.0
    fused_merge: bool = True
    direct_collectives: bool = True
    calibration: str | None = None
    auto_probe: bool = False
    hosts: tuple[str, ...] | None = field(default=None)
    packed_split: str = "document"
    # off by default: cuDNN plans every new document shape (~6 ms of host time each), see the docstring
    packed_dense_rows: int | None = None
    packed_kernel: str = "auto"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "num_rings", _positive_int_or_auto("num_rings", self.num_rings, allow_none=True))
        set_(self, "chunks", _positive_int_or_auto("chunks", self.chunks, allow_none=False))
        set_(self, "transport", _choice_or_auto("transport", self.transport, TRANSPORTS))
        kernel = self.kernel
        if kernel is not None:
            if not isinstance(kernel, str):
                raise TaspOptionError(f"kernel must be a kernel name or 'auto', got {kernel!r}")
            kernel = kernel.strip().lower() or None
            kernel = None if kernel == "auto" else kernel
        set_(self, "kernel", kernel)
        set_(self, "keep_kv", parse_keep_kv(self.keep_kv))
        set_(self, "keep_kv_cap_mib", _positive_float("keep_kv_cap_mib", self.keep_kv_cap_mib))
        set_(self, "dkv_dtype", _choice("dkv_dtype", self.dkv_dtype, DKV_DTYPES, {"float32": "fp32"}))
        set_(self, "packed_split", _choice("packed_split", self.packed_split, PACKED_SPLITS))
        set_(self, "packed_dense_rows", _positive_int_or_none("packed_dense_rows", self.packed_dense_rows))
        set_(self, "packed_kernel", _choice("packed_kernel", self.packed_kernel, PACKED_KERNELS))
        set_(self, "timeout_s", _positive_float("timeout_s", self.timeout_s))
        set_(self, "fused_merge", parse_bool("fused_merge", self.fused_merge))
        set_(self, "direct_collectives", parse_bool("direct_collectives", self.direct_collectives))
        set_(self, "auto_probe", parse_bool("auto_probe", self.auto_probe))
        set_(self, "cuda_graphs", parse_bool("cuda_graphs", self.cuda_graphs))
        topo = self.topology
        if isinstance(topo, os.PathLike):
            topo = os.fspath(topo)
        if isinstance(topo, str):
            topo = topo.strip() or None
        set_(self, "topology", topo)
        cal = self.calibration
        set_(self, "calibration", os.fspath(cal) if cal is not None and str(cal).strip() else None)
        hosts = self.hosts
        if hosts is not None:
            if isinstance(hosts, str):
                hosts = hosts.split(",")
            hosts = tuple(str(h).strip() for h in hosts)
            if not hosts or not all(hosts):
                raise TaspOptionError(f"hosts must name the host of every CP rank, got {self.hosts!r}")
        set_(self, "hosts", hosts)
        if self.transport == "symm" and self.keep_kv is True:
            raise TaspOptionError("keep_kv=True needs per-call KV buffers, but transport 'symm' moves pieces through "
                                  "two persistent symmetric-memory buffers shared by every call: use keep_kv=False "
                                  "(or 'auto') with 'symm', or transport='a2a'")

    @property
    def keep_kv_cap_bytes(self) -> float:
        """What keep_kv='auto' keeps per call at most, in bytes."""
        return self.keep_kv_cap_mib * 2**20

    def replace(self, **changes: Any) -> TaspOptions:
        """A copy with ``changes`` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a Topology object as its name), e.g. for benchmark records and logs."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["topology"] is not None and not isinstance(out["topology"], str):
            out["topology"] = getattr(out["topology"], "name", str(out["topology"]))
        if out["hosts"] is not None:
            out["hosts"] = list(out["hosts"])
        return out


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TaspOptions))
_ENV_NAMES = {"keep_kv_cap_mib": "KEEP_KV_MIB"}  # the variable's established name
_NOT_FROM_ENV = {"packed_split"}  # a fact of how the caller's data was split, never a process-wide knob
ENV_VARS: dict[str, str] = {f"{ENV_PREFIX}{_ENV_NAMES.get(name, name.upper())}": name for name in FIELDS
                            if name not in _NOT_FROM_ENV}

_ENV_CACHE: dict[str, Any] | None = None


def _read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    found = {}
    for var, name in ENV_VARS.items():
        text = environ.get(var)
        if text is not None and text.strip() != "":
            found[name] = text.strip()
    try:
        TaspOptions(**found)
    except TaspOptionError as exc:
        names = ", ".join(f"{ENV_PREFIX}{n.upper()}" for n in sorted(found))
        raise TaspOptionError(f"{exc} (from the environment: {names})") from None
    return found


def env_options() -> dict[str, Any]:
    """The fields set by ``MEGATRON_TASP_*`` environment variables (read once per process)."""
    global _ENV_CACHE
    if _ENV_CACHE is None:
        _ENV_CACHE = _read_env(os.environ)
    return dict(_ENV_CACHE)


def reload_env() -> None:
    """Forget the environment snapshot: the next :func:`env_options` reads ``os.environ`` again."""
    global _ENV_CACHE
    _ENV_CACHE = None


def env_flag(name: str, default: str | None = None) -> str | None:
    """A ``MEGATRON_TASP_<NAME>`` variable that is not a TASP option (e.g. the launcher's VERBOSE); every
    read of a ``MEGATRON_TASP_*`` variable goes through this module (other tools' variables, such as
    ``MEGATRON_LM_PATH`` or ``CUDA_DEVICE_MAX_CONNECTIONS``, are read where they are used)."""
    return os.environ.get(f"{ENV_PREFIX}{name.upper()}", default)


def parse_options(given: Mapping[str, Any] | TaspOptions | None = None, *, use_env: bool = True,
                  where: str = "") -> TaspOptions:
    """Options from defaults < environment < ``given`` (a mapping of field names; None values mean 'not
    given'; keys may carry a ``tasp_`` prefix). A TaspOptions is returned unchanged. ``where`` names the
    source (a flag set, a recipe file) in errors."""
    if isinstance(given, TaspOptions):
        return given
    values = env_options() if use_env else {}
    for key, value in (given or {}).items():
        name = key[5:] if key.startswith("tasp_") else key
        if name not in FIELDS:
            valid = ", ".join(FIELDS)
            raise TaspOptionError(f"unknown TASP option {key!r}{f' in {where}' if where else ''}; valid: {valid}")
        if value is not None:
            values[name] = value
    try:
        return TaspOptions(**values)
    except TaspOptionError as exc:
        raise TaspOptionError(f"{exc}{f' ({where})' if where else ''}") from None


def default_options() -> TaspOptions:
    """Defaults with the environment's overrides (what ``tasp_attention`` uses when given no options)."""
    return parse_options(None)


def keep_kv_cap_bytes() -> float:
    """What keep_kv='auto' keeps per call at most under the default options (environment included)."""
    return default_options().keep_kv_cap_bytes


def keep_kv_auto(world_size: int, local_kv_bytes: int, transport: str, cap_bytes: float | None = None) -> bool:
    """What keep_kv='auto' decides: keep the (n - 1) received pieces (each the size of the local K plus V)
    when they fit under the cap and the transport allocates per call (not 'symm', whose two persistent
    buffers are shared by every call)."""
    cap = keep_kv_cap_bytes() if cap_bytes is None else cap_bytes
    return transport != "symm" and (world_size - 1) * local_kv_bytes <= cap


__all__ = ["DKV_DTYPES", "ENV_VARS", "FIELDS", "KEEP_KV_AUTO_MIB", "PACKED_KERNELS", "PACKED_SPLITS", "TRANSPORTS",
           "TaspOptionError", "TaspOptions",
           "default_options", "env_flag", "env_options", "keep_kv_auto", "keep_kv_cap_bytes",
           "parse_bool", "parse_keep_kv", "parse_options", "reload_env"]
