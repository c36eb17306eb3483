"""Starting ranks on one machine: forked CPU/gloo workers (:mod:`.fork`)."""

from megatron_tasp.launch.fork import WorkerError, free_port, run_workers

__all__ = ["WorkerError", "free_port", "run_workers"]
