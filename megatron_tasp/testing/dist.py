"""Deprecated alias of :mod:`megatron_tasp.launch.fork` (kept until every caller imports megatron_tasp.launch)."""

from megatron_tasp.launch.fork import WorkerError, free_port, run_workers

__all__ = ["WorkerError", "free_port", "run_workers"]
