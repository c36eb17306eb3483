"""Test-session hooks.

``MEGATRON_TASP_DUMP_HANG_S=N``: every forked rank (``megatron_tasp.launch.run_workers``) dumps all its
threads' stacks to ``/tmp/megatron_tasp_rank<pid>.stack`` and exits if it still runs after N seconds
(a debugging aid for hanging multi-rank tests).
"""

from __future__ import annotations

import faulthandler
import os

from megatron_tasp.options import env_flag


def _dump_hang_after_fork() -> None:
    seconds = env_flag("DUMP_HANG_S")
    if seconds:
        stream = open(f"/tmp/megatron_tasp_rank{os.getpid()}.stack", "w")  # noqa: SIM115 - kept open for the dump
        faulthandler.dump_traceback_later(float(seconds), exit=True, file=stream)


os.register_at_fork(after_in_child=_dump_hang_after_fork)
