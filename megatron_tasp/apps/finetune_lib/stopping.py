"""Stopping a run on SIGINT/SIGTERM at a step boundary that every rank agrees on.

Each rank records the signal in its handler (nothing else happens there). At every step boundary the
ranks all-reduce (MAX) one integer, the signal number or 0, over the default process group, so they all
stop after the same step, even when only some of them got the signal; then the trainer saves a normal
checkpoint. That is one 4-byte collective per step: negligible on gloo, and on GPUs one tiny NCCL
all-reduce (its host synchronisation is the ``.item()`` that reads the flag, once per step).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.launch.lifecycle import STOP_SIGNALS, unblock_stop_signals


class StopRequest:
    """SIGINT/SIGTERM handlers for one run (a context manager: installs, then restores the previous ones)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
            unblock_stop_signals()  # forked ranks start with them blocked (delivered now if pending)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self, device: torch.device) -> int:
        """The signal some rank received (0: none); collective over the default group when there is one."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


__all__ = ["StopRequest"]
