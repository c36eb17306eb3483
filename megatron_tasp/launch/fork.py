"""Run a function on N forked gloo ranks (CPU) and collect results or the first failure.

Used by ``megatron-tasp finetune`` on CPU, ``megatron-tasp bench`` and the tests.

Fork (not spawn) is used on purpose: the parent has already imported torch (and Megatron), so an
8-rank world starts in a fraction of a second on a 2-core machine instead of re-importing per rank.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any,
            timeout_s: float) -> None:
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


class WorkerError(RuntimeError):
    """A forked rank raised; the message holds its traceback."""


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks; return results by rank.

    Raises WorkerError with the failing rank's traceback, or on timeout.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout_s), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size and not errors:
            try:
                rank, ok, payload = queue.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs)
                        if p.exitcode is not None and r not in results]
                if dead:
                    time.sleep(0.3)  # a report may still be in the pipe
                    if queue.empty():
                        errors.append(f"rank(s) died without reporting: {dead} (rank, exit code)")
                if time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout_s:.0f}s waiting for ranks; got {sorted(results)}")
                continue
            if ok:
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise WorkerError("\n".join(errors))
    return [results[r] for r in range(world_size)]


__all__ = ["WorkerError", "free_port", "run_workers"]
