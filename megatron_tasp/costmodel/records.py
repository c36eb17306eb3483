"""One benchmark record type, one loader and one FLOP formula, shared by bench, report and simulate.

``megatron-tasp bench`` writes a JSON list of :class:`BenchRecord` dicts (:meth:`BenchRecord.to_dict`);
:func:`load_records` reads them back, including the files written before this format existed (their
fields are mapped, see :meth:`BenchRecord.from_dict`). Pure Python, no torch.

A record says what the engine did explicitly: ``keep_kv`` (the backward ran on the forward's KV pieces),
``dkv_dtype`` (the travelling dK/dV accumulator: ``fp32`` or ``input``) and ``dkv_own_travels`` (set only
on the first 2026-11-25 run, whose backward sent the own dK/dV around the ring too; no engine since does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RECORD_FORMAT", "BenchRecord", "RecordError", "attention_flops", "load_records", "write_records"]

#: Format of the records bench writes now; files without a ``format`` field are mapped by ``from_dict``.
RECORD_FORMAT = 2
#: The tag of the backward that every engine since the first run uses (own dK/dV stays home, remote
#: accumulators start at step 1 and hop home in the input dtype).
_CURRENT_BACKWARD_TAG = "remote-acc-home-input-dtype"
_RENAMED = {"pass": "passes"}


class RecordError(ValueError):
    """A benchmark file or record that cannot be read; the message names the file and the fix."""


def attention_flops(seq: int, batch: int, heads: int, head_dim: int, causal: bool, passes: str) -> float:
    """FLOPs of attention over a whole sequence of ``seq`` tokens, counting the true mask area: forward
    ``4 b h S^2 d`` (half of it when causal), forward + backward 3.5x the forward."""
    f = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return f * (3.5 if passes == "fwd_bwd" else 1.0)


@dataclass
class BenchRecord:
    """One measurement of ``megatron-tasp bench``: an attention call (``kind='attention'``) or one
    exchange of the transport sweep (``kind='transport'``). ``None`` = not applicable / not measured."""

    impl: str
    kind: str = "attention"
    cp: int = 1
    # shape of an attention record
    tokens_per_gpu: int = 0
    heads_q: int = 0
    heads_kv: int = 0
    head_dim: int = 0
    batch: int = 1
    causal: bool = True
    dtype: str = "bfloat16"
    passes: str = "fwd"  # "fwd" or "fwd_bwd" (JSON key "pass")
    # what TASP ran ('auto' resolved); the request as given
    num_rings: int = 0
    transport: str | None = None  # a2a, p2p, symm; "none" for compute-only (a local copy)
    chunks: int = 1
    keep_kv: bool | None = None
    dkv_dtype: str | None = None  # "fp32" or "input"
    dkv_own_travels: bool = False
    kernel: str | None = None
    requested: dict[str, Any] | None = None
    # results
    time_ms: float | None = None
    tflops_per_gpu: float | None = None
    max_rel_err: float | None = None
    extra_mem_mb: float | None = None
    error: str | None = None
    note: str = ""
    # transport sweep
    messages: int = 1
    bytes: int = 0
    GBps_per_direction: float | None = None
    # machine and provenance
    device: str = ""
    torch: str = ""
    nccl: str = ""
    cudnn: str = ""
    cuda: str = ""
    date: str = ""
    source: str = ""  # file the record was loaded from (not written)
    format: int = RECORD_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # fields this type does not know, kept as read

    @property
    def timed(self) -> bool:
        """A successful timing (no error, a positive time)."""
        return self.error is None and isinstance(self.time_ms, (int, float)) and self.time_ms > 0

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the inputs."""
        return 4 if self.dtype in ("float32", "fp32") else 2

    @property
    def dkv_bytes(self) -> int:
        """Bytes per element of the travelling dK/dV accumulator."""
        return self.dtype_bytes if self.dkv_dtype == "input" else 4

    def flops(self) -> float:
        """FLOPs of the whole call over all ``cp`` ranks (see :func:`attention_flops`)."""
        return attention_flops(self.tokens_per_gpu * self.cp, self.batch, self.heads_q, self.head_dim, self.causal,
                               self.passes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object bench writes (``pass`` for ``passes``; unknown fields read back as they were)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source"):
                continue
            out[{"passes": "pass"}.get(f.name, f.name)] = getattr(self, f.name)
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> BenchRecord:
        """A record from a JSON object of any bench version.

        Files before format 2 are mapped: ``dkv_scheme='remote-acc-home-input-dtype'`` is the current
        backward (dK/dV in fp32, the bench default then); no tag at all is the first run's backward
        (``dkv_own_travels``); ``keep_kv`` absent means the KV was exchanged again (before kept KV existed);
        ``peak_mem_mb`` is kept under ``extra`` (it counted the inputs too).
        """
        d = {_RENAMED.get(k, k): v for k, v in data.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        if "impl" not in d:
            raise RecordError(f"{source or 'record'}: a benchmark record needs an 'impl' field, got {sorted(data)}")
        if "format" not in d:  # written before the explicit fields existed
            d["format"] = 1
            tag = d.pop("dkv_scheme", None)
            if d.get("kind") != "transport" and d.get("impl") in ("tasp", "compute_only"):
                d["dkv_own_travels"] = tag != _CURRENT_BACKWARD_TAG
                d.setdefault("dkv_dtype", "fp32")
                if d.get("keep_kv") is None:
                    d["keep_kv"] = False
            d.setdefault("kind", "attention")
        d["kind"] = d.get("kind") or "attention"
        source = source or str(d.pop("source", "") or "")
        d.pop("source", None)
        extra = {k: d.pop(k) for k in list(d) if k not in names}
        extra.update(d.pop("extra", None) or {})
        if d.get("chunks") is None:
            d["chunks"] = 1
        return cls(**d, extra=extra, source=source)


def _read(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from None


def load_records(paths: Iterable[str | os.PathLike[str]]) -> list[BenchRecord]:
    """All records of the given benchmark JSON files (each a JSON list of records), in file order."""
    out: list[BenchRecord] = []
    for p in paths:
        data = _read(p)
        if not isinstance(data, list):
            raise RecordError(f"{p}: expected a JSON list of benchmark records (megatron-tasp bench --out)")
        out.extend(BenchRecord.from_dict(r, source=Path(p).name) for r in data if isinstance(r, dict))
    return out


def write_records(path: str | os.PathLike[str], records: Iterable[BenchRecord]) -> None:
    """Write records as a JSON list (atomically: a temporary file renamed over ``path``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in records], indent=1) + "\n", encoding="utf-8")
    tmp.replace(target)
