"""One run per directory: an exclusive ``flock`` on ``<dir>/.megatron-tasp.lock``.

The kernel releases the lock when the holder's last descriptor closes, so a killed run never leaves a lock
that blocks the next one; forked ranks inherit the descriptor and keep the lock until they end too. The
file holds the holder's pid and host for the message a second run prints. A file still naming a holder
whose lock is free is stale (that run was killed): it is taken over and the takeover is logged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".megatron-tasp.lock"
logger = logging.getLogger("megatron_tasp.finetune")


class LockHeld(RuntimeError):
    """Another live process holds the directory's lock; the message names it and the ways out."""


def _holder(text: str) -> tuple[str, str]:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    return fields.get("pid", "?"), fields.get("host", "?")


class DirLock:
    """Exclusive lock on a directory (created if missing); a context manager."""

    def __init__(self, directory: str | os.PathLike[str], what: str = "output directory",
                 fix: str = "choose another output directory") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what, self.fix = what, fix
        self._fd: int | None = None

    def acquire(self, wait: bool = False, poll_s: float = 0.5) -> DirLock:
        """Take the lock; raise LockHeld at once when another process holds it (or wait with ``wait``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        announced = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pid, host = _holder(os.pread(fd, 256, 0).decode("utf-8", "replace"))
                    if not wait:
                        raise LockHeld(f"{self.directory} is in use by pid {pid} on host {host} (lock {self.path}); "
                                       f"wait for that run to end, {self.fix}, or pass --wait-for-lock to wait for "
                                       "it") from None
                    if not announced:
                        logger.warning("[finetune] waiting for pid %s on host %s to release %s", pid, host, self.path)
                        announced = True
                    time.sleep(poll_s)
            old = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            if old:
                pid, host = _holder(old)
                logger.warning("[finetune] taking over the stale lock %s of pid %s on host %s (that run ended "
                               "without releasing it)", self.path, pid, host)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder's record and unlock (the file stays: removing it would race with a waiter)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


__all__ = ["LOCK_NAME", "DirLock", "LockHeld"]
