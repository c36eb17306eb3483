"""Test-session hooks and shared fixtures.

``no_tasp_env``: a test runs with no ``MEGATRON_TASP_*`` option variable set and a fresh environment
snapshot (tests that need one set it themselves).

``MEGATRON_TASP_DUMP_HANG_S=N``: every forked rank (``megatron_tasp.launch.run_workers``) dumps all its
threads' stacks to ``/tmp/megatron_tasp_rank<pid>.stack`` and exits if it still runs after N seconds
(a debugging aid for hanging multi-rank tests).
"""

from __future__ import annotations

import faulthandler
import os

import pytest

from megatron_tasp import options as tasp_options
from megatron_tasp.options import env_flag


def _dump_hang_after_fork() -> None:
    seconds = env_flag("DUMP_HANG_S")
    if seconds:
        stream = open(f"/tmp/megatron_tasp_rank{os.getpid()}.stack", "w")  # noqa: SIM115 - kept open for the dump
        faulthandler.dump_traceback_later(float(seconds), exit=True, file=stream)


os.register_at_fork(after_in_child=_dump_hang_after_fork)


@pytest.fixture
def no_tasp_env(monkeypatch):
    """No ``MEGATRON_TASP_*`` option variable during the test; the options module re-reads the environment
    before and after it."""
    for var in tasp_options.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    tasp_options.reload_env()
    yield
    tasp_options.reload_env()
