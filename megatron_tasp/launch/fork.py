"""Run a function on N forked gloo ranks (CPU) and collect results or the first failure.

Used by ``megatron-tasp finetune`` on CPU, ``megatron-tasp bench`` and the tests.

Fork (not spawn) is used on purpose: the parent has already imported torch (and Megatron), so an
8-rank world starts in a fraction of a second on a 2-core machine instead of re-importing per rank.

Lifecycle: every rank dies with the launcher (:class:`~megatron_tasp.launch.lifecycle.ParentWatch`, also
after ``kill -9`` of the launcher). With ``forward_signals=True`` the launcher passes SIGINT/SIGTERM on to
the ranks (which decide together where to stop; see ``finetune_lib.stopping``), and a second signal kills
them. When a rank fails, the launcher names the cause (a rank killed by a signal or exiting without a
report outranks the peers' resulting connection errors), stops the other ranks and raises
:class:`WorkerError`.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_tasp.launch.lifecycle import (
    STOP_SIGNALS,
    ParentWatch,
    block_stop_signals,
    describe_exit,
    restore_mask,
    unblock_stop_signals,
)

GRACE_S = 3.0  # after a first failure, how long the other ranks get to report before they are killed


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any,
            timeout_s: float, watch: ParentWatch, keep_blocked: bool) -> None:
    watch.attach()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not the launcher's forwarding handlers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not keep_blocked:  # otherwise fn installs its own handlers, then unblocks
        unblock_stop_signals()
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)  # tensors inline: no shared-memory handles outliving this process
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        queue.close()
        queue.join_thread()  # flush the report before the hard exit
        os._exit(0)


@dataclass
class RankFailure:
    """How one rank failed: an exception it reported (``error``, a traceback) or an exit without a report."""

    rank: int
    pid: int | None
    exitcode: int | None = None
    error: str | None = None

    def line(self) -> str:
        """One line: 'rank 1 (pid 42) was killed by SIGKILL' or 'rank 0 (pid 41) raised ValueError: ...'."""
        who = f"rank {self.rank} (pid {self.pid})"
        if self.error is None:
            return f"{who} {describe_exit(self.exitcode)}"
        last = next((x for x in reversed(self.error.strip().splitlines()) if x.strip()), "an exception")
        return f"{who} raised {last.strip()}"


class WorkerError(RuntimeError):
    """Forked ranks failed. ``str()`` holds every failure with tracebacks; :attr:`summary` is one line naming
    the cause; :attr:`failures` lists them, the cause first."""

    def __init__(self, failures: list[RankFailure], note: str = "") -> None:
        self.failures = failures
        self.note = note
        parts = [note] if note else []
        for f in failures:
            parts.append(f"rank {f.rank}:\n{f.error}" if f.error else f.line())
        super().__init__("\n".join(parts))

    @property
    def summary(self) -> str:
        """The cause in one line."""
        if self.failures:
            return self.failures[0].line() + (f" ({self.note})" if self.note else "")
        return self.note or "the ranks failed"


def _order(failures: list[RankFailure]) -> list[RankFailure]:
    """The likely cause first: a rank that died without reporting, then the first reported exception."""
    died = [f for f in failures if f.error is None]
    return died + [f for f in failures if f.error is not None]


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
                forward_signals: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks; return results by rank.

    With ``forward_signals`` SIGINT/SIGTERM received by this process are passed on to the ranks (a second
    one kills them), and the ranks start with those signals blocked: ``fn`` installs handlers and unblocks.
    Raises WorkerError naming the failing rank, or on timeout.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    watch = ParentWatch()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout_s, watch,
                                               forward_signals), daemon=True)
             for r in range(world_size)]
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL if len(received) > 1 else signum)
                except ProcessLookupError:
                    pass

    mask = block_stop_signals()  # ranks inherit the blocked mask; the launcher's handlers are set meanwhile
    previous = {}
    try:
        if forward_signals:
            previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
        for p in procs:
            p.start()
    finally:
        restore_mask(mask)
    results: dict[int, Any] = {}
    failures: list[RankFailure] = []
    note = ""
    deadline = time.monotonic() + timeout_s
    grace_end: float | None = None
    try:
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            if grace_end is not None and now > grace_end:
                break
            if grace_end is None and now > deadline:
                note = f"timed out after {timeout_s:.0f}s waiting for ranks; got {sorted(results)}"
                break
            try:
                rank, ok, payload = queue.get(timeout=0.2)
            except queue_mod.Empty:
                known = set(results) | {f.rank for f in failures}
                for r, p in enumerate(procs):
                    if p.exitcode is not None and r not in known:
                        time.sleep(0.3)  # a report may still be in the pipe
                        if queue.empty():
                            failures.append(RankFailure(r, p.pid, p.exitcode))
                        break
            else:
                if ok:
                    import torch

                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    failures.append(RankFailure(rank, procs[rank].pid, error=payload))
            if failures and grace_end is None:
                grace_end = time.monotonic() + GRACE_S
                if len(received) > 1:
                    note = "stopped by a second signal"
    finally:
        for p in procs:
            p.join(timeout=5 if not failures and not note else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
        watch.close()
    if failures or note:
        known = {f.rank for f in failures}
        failures += [RankFailure(r, p.pid, p.exitcode) for r, p in enumerate(procs)
                     if r not in known and r not in results and p.exitcode not in (None, 0, -signal.SIGKILL)]
        raise WorkerError(_order(failures), note)
    return [results[r] for r in range(world_size)]


__all__ = ["RankFailure", "WorkerError", "free_port", "run_workers"]
