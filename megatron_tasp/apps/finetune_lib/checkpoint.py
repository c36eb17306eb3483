"""Crash-safe Megatron distributed checkpoints (``megatron.core.dist_checkpointing``, torch_dist format).

Layout of a checkpoint directory::

    <dir>/latest                    # text: the step of the newest complete checkpoint (written last)
    <dir>/iter_0000120/             # one complete checkpoint (Megatron torch_dist format)
        .metadata  __0_0.distcp ...  metadata.json   # written by dist_checkpointing.save
        megatron_tasp.json           # our marker: step, world layout, recipe name (written after the data)

Saving never touches the last good checkpoint until the new one is complete: every rank writes into
``<dir>/.tmp-iter_XXXXXXX-<token>/``; after a barrier rank 0 writes ``megatron_tasp.json`` (fsync), renames
the directory to ``iter_XXXXXXX`` (atomic on POSIX filesystems) and only then replaces ``latest``
(write to a temporary file, fsync, ``os.replace``). A crash at any point leaves ``latest`` pointing at a
complete checkpoint; leftover ``.tmp-*`` directories are removed by the next save.

What is stored: the model's ``sharded_state_dict()`` under ``model``, the sharded optimizer state
(:mod:`.optimizer`), and common values (step, consumed samples, RNG states of rank 0, the recipe).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LATEST = "latest"
MARKER = "megatron_tasp.json"
TMP_PREFIX = ".tmp-"
MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found or read; the message names the path."""


def iter_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps."""
    return f"iter_{step:07d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    """A checkpoint directory whose data and our marker are both written."""
    return (path / MARKER).is_file() and (path / "metadata.json").is_file()


def find_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to load from ``path``: ``path/latest``'s target (Megatron-LM's
    ``latest_checkpointed_iteration.txt`` is understood too), or ``path`` itself if it is one.

    Returns None when ``path`` holds no checkpoint yet; raises CheckpointError when ``latest`` points at
    something incomplete.
    """
    p = Path(path)
    if is_complete(p):
        return p
    latest = p / LATEST
    if latest.is_file():
        text = latest.read_text(encoding="utf-8").strip()
        try:
            step = int(text)
        except ValueError:
            raise CheckpointError(f"{latest}: expected a step number, got {text!r}") from None
        target = p / iter_name(step)
        if not is_complete(target):
            raise CheckpointError(f"{latest} points at {target}, which is missing or incomplete")
        return target
    tracker = p / MEGATRON_LM_TRACKER  # a Megatron-LM checkpoint directory (torch_dist format)
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8").strip()
        target = p / (iter_name(int(text)) if text.isdigit() else text)
        if not (target / "metadata.json").is_file():
            raise CheckpointError(f"{tracker} points at {target}, which is not a distributed (torch_dist) checkpoint")
        return target
    if (p / "metadata.json").is_file():  # a Megatron checkpoint written by another tool
        return p
    return None


def read_marker(path: Path) -> dict[str, Any]:
    """Our metadata of a checkpoint (empty for checkpoints written by other tools)."""
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def cpu_checkpoint_io() -> Iterator[None]:
    """Let dist_checkpointing's synchronous save run without CUDA and inside daemon worker processes.

    Its writer calls ``torch.cuda.synchronize()`` unconditionally and creates a multiprocessing Manager
    queue for write results (a child process, impossible in a daemon process). A synchronous save only
    uses that queue inside this process, so an in-process queue serves; without CUDA the synchronize is
    skipped. Nothing changes on a CUDA machine except the queue.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        fa = None
    if fa is not None and getattr(fa, "_results_queue", "missing") is None:
        fa._results_queue = queue.Queue()
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.synchronize = original


def _require_psutil() -> None:
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        raise ImportError("Megatron's dist_checkpointing needs psutil to write checkpoints: pip install psutil "
                          "(or set checkpoint.save: false)")


def _broadcast_text(text: str) -> str:
    obj = [text]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(root: Path, step: int, state: dict[str, Any], marker: dict[str, Any], keep_last: int = 0,
                    *, fault_hook: Any = None) -> Path:
    """Collectively save ``state`` (a sharded state dict) as ``root/iter_<step>``; return that path.

    ``fault_hook(stage)`` (tests) is called at "written" (data on disk, not yet committed) and
    "committed" (renamed, ``latest`` not yet updated).
    """
    from megatron.core import dist_checkpointing

    _require_psutil()
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(root)
    final = root / iter_name(step)
    token = _broadcast_text(uuid.uuid4().hex[:10] if rank == 0 else "")
    tmp = root / f"{TMP_PREFIX}{final.name}-{token}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier()
    if not tmp.is_dir():  # each node must see the same directory: checkpoint.dir must be on a shared filesystem
        raise CheckpointError(f"{tmp} created by rank 0 is not visible on rank {rank}: put checkpoint.dir on a "
                              "filesystem shared by all nodes")
    with cpu_checkpoint_io():
        dist_checkpointing.save(state, str(tmp),
                                preprocess_common_before_consistancy_check=lambda common: {
                                    k: v for k, v in common.items() if k != "rng"})
    _barrier()
    if fault_hook is not None:
        fault_hook("written")
    if rank == 0:
        record = dict(marker, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _write_atomic(tmp / MARKER, json.dumps(record, indent=1))
        trash = None
        if final.exists():  # re-saving a step: move the old copy aside first (latest still names a complete dir)
            trash = root / f"{TMP_PREFIX}old-{final.name}-{token}"
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        if fault_hook is not None:
            fault_hook("committed")
        _write_atomic(root / LATEST, f"{step}\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        _cleanup(root, keep_last, keep=final, token=token)
    _barrier()
    return final


def _cleanup(root: Path, keep_last: int, keep: Path, token: str) -> None:
    """Remove leftovers of interrupted saves and checkpoints beyond the newest ``keep_last``."""
    for p in root.glob(f"{TMP_PREFIX}*"):
        if token not in p.name:
            shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        done = sorted(p for p in root.glob("iter_*") if p.is_dir() and is_complete(p))
        for p in done[:-keep_last]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, state: dict[str, Any], strict: bool = False) -> dict[str, Any]:
    """Collectively load the tensors described by ``state`` from checkpoint ``path``; return the loaded dict."""
    from megatron.core import dist_checkpointing

    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a Megatron distributed checkpoint (no metadata.json)")
    with cpu_checkpoint_io():
        return dist_checkpointing.load(state, str(path), strict="assume_ok_unexpected" if not strict else "raise_all")


def rng_state() -> dict[str, Any]:
    """RNG states of this process (Python, NumPy, torch CPU, CUDA and Megatron's tracker when present)."""
    import random

    import numpy as np

    out: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            out["tracker"] = get_cuda_rng_tracker().get_states()
        except Exception:  # noqa: BLE001 - tracker layout varies across versions
            pass
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output (missing entries are skipped)."""
    import random

    import numpy as np

    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        if "tracker" in state:
            try:
                from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

                get_cuda_rng_tracker().set_states(state["tracker"])
            except Exception:  # noqa: BLE001
                pass


__all__ = ["CheckpointError", "LATEST", "MARKER", "cpu_checkpoint_io", "find_checkpoint", "is_complete",
           "iter_name", "load_checkpoint", "read_marker", "rng_state", "save_checkpoint", "set_rng_state"]
