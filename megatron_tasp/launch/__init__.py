"""Starting ranks on one machine: forked CPU/gloo workers (:mod:`.fork`), their lifecycle (:mod:`.lifecycle`)
and the lock on a run's output directory (:mod:`.lock`)."""

from megatron_tasp.launch.fork import RankFailure, WorkerError, free_port, run_workers

__all__ = ["RankFailure", "WorkerError", "free_port", "run_workers"]
