"""Cost model of TASP attention (docs/COSTMODEL.md).

* :mod:`~megatron_tasp.costmodel.model`: ``predict`` (pure Python; what ``num_rings='auto'`` uses), with the
  inputs in :mod:`~megatron_tasp.costmodel.params` (``Shape``, ``Calibration``) and the calibration-free
  structure of a call in :mod:`~megatron_tasp.costmodel.structure`.
* :mod:`~megatron_tasp.costmodel.records`: the one benchmark record type, its loader and the FLOP formula.
* :mod:`~megatron_tasp.costmodel.fitting` and :mod:`~megatron_tasp.costmodel.report`: fitting and error
  reports, offline; loaded on first use of their names.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from megatron_tasp.costmodel.model import TRANSPORTS, Prediction, StepTime, keeps_kv, predict
from megatron_tasp.costmodel.params import (
    DEFAULT_CALIBRATION_DICT,
    PASSES,
    Calibration,
    CostModelError,
    KernelRate,
    Shape,
    default_calibration,
)
from megatron_tasp.costmodel.records import BenchRecord, RecordError, attention_flops, load_records, write_records
from megatron_tasp.costmodel.structure import ring_counts

_LAZY = {
    "calibrate": "megatron_tasp.costmodel.fitting",
    "load_calibration": "megatron_tasp.costmodel.fitting",
    "nelder_mead": "megatron_tasp.costmodel.fitting",
    "ErrorReport": "megatron_tasp.costmodel.report",
    "error_report": "megatron_tasp.costmodel.report",
}

__all__ = [
    "DEFAULT_CALIBRATION_DICT", "PASSES", "TRANSPORTS", "BenchRecord", "Calibration", "CostModelError",
    "KernelRate", "Prediction", "RecordError", "Shape", "StepTime", "attention_flops", "default_calibration",
    "keeps_kv", "load_records", "predict", "ring_counts", "write_records", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_tasp.costmodel' has no attribute {name!r}")
