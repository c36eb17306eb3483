"""Process lifecycle of forked ranks: die with the launcher, stop signals, and how a process ended.

- :class:`ParentWatch`: a rank ends as soon as its launcher is gone, even after ``kill -9`` of the launcher.
  Linux delivers a parent-death signal (``prctl(PR_SET_PDEATHSIG)``, set through ctypes); everywhere (and in
  case the prctl call fails) a watcher thread also sees the launcher go: it holds the read end of a pipe
  whose only writer is the launcher, and the read returns end-of-file when the launcher's last descriptor
  closes, i.e. when it exits for any reason. The thread re-checks the parent pid on a timer as well.
- :data:`STOP_SIGNALS`, :func:`block_stop_signals`, :func:`unblock_stop_signals`: SIGINT and SIGTERM are
  blocked while ranks are forked, so a rank sees them only once it has installed its own handlers.
- :func:`describe_exit`: "was killed by SIGKILL" / "exited with code 3" from a ``Process.exitcode``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import signal
import sys
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2 (the number as text when unknown)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code_for(signum: int) -> int:
    """The shell's exit status of a process stopped by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def describe_exit(exitcode: int | None) -> str:
    """How a child ended, from ``multiprocessing.Process.exitcode`` (negative: killed by that signal)."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        return f"was killed by {signal_name(-exitcode)}"
    return f"exited with code {exitcode}"


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent exits; False where prctl is absent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(int(signum)), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def block_stop_signals() -> set[int]:
    """Block SIGINT/SIGTERM in this thread; returns the previous mask (for :func:`restore_mask`)."""
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS))


def unblock_stop_signals() -> None:
    """Deliver SIGINT/SIGTERM (pending ones now) to this thread again."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def restore_mask(mask: set[int]) -> None:
    """Restore a mask returned by :func:`block_stop_signals`."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class ParentWatch:
    """Created in the launcher before forking; each forked rank calls :meth:`attach` first thing."""

    def __init__(self) -> None:
        self.parent_pid = os.getpid()
        self._read_fd, self._write_fd = os.pipe()

    def attach(self, use_prctl: bool = True) -> None:
        """In the child: die (SIGKILL) when the launcher is gone; returns at once."""
        os.close(self._write_fd)  # the launcher must hold the only writer
        if use_prctl:
            set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != self.parent_pid:  # the launcher died before the line above took effect
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=self._watch, name="parent-watch", daemon=True).start()

    def _watch(self) -> None:
        while True:
            ready, _, _ = select.select([self._read_fd], [], [], 1.0)
            if ready or os.getppid() != self.parent_pid:  # end-of-file: the launcher's descriptor closed
                os.kill(os.getpid(), signal.SIGKILL)
                return

    def close(self) -> None:
        """In the launcher, once every rank has ended."""
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


__all__ = ["STOP_SIGNALS", "ParentWatch", "block_stop_signals", "describe_exit", "exit_code_for", "restore_mask",
           "set_parent_death_signal", "signal_name", "unblock_stop_signals"]
