"""Start the fine-tuning ranks: under torchrun/srun, as forked CPU workers, or by re-executing via torchrun.

- ``RANK`` and ``WORLD_SIZE`` in the environment (torchrun, or srun -> torchrun): this process is one rank;
  the default process group is created from the environment (NCCL on GPUs, gloo on CPU).
- Otherwise finetune starts the ranks itself: ``tp * cp * dp`` of them (with ``parallel.dp: null``: one per
  visible GPU, rounded down to a multiple of ``tp * cp``; 1 DP rank on CPU). On CPU it forks gloo workers
  (fast: torch and Megatron are imported once, before the fork); on GPUs it re-executes the same command
  under ``torchrun --standalone --nproc-per-node N`` (CUDA cannot be forked). One rank runs in-process.

One run per output directory: the launcher (or rank 0 under torchrun/srun) holds a lock on the output
directory, and on the checkpoint directory when that lies elsewhere (:mod:`megatron_tasp.launch.lock`).
Forked ranks die with the launcher; SIGINT/SIGTERM reach every rank, which stop together at a step
boundary and save (:mod:`.stopping`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from megatron_tasp.apps.finetune_lib.recipe import Recipe, RecipeError

LAUNCHERS = ("auto", "fork", "torchrun")
logger = logging.getLogger("megatron_tasp.finetune")


def quiet_megatron() -> None:
    """Silence Megatron's start-up warnings and deprecation notes (MEGATRON_TASP_VERBOSE=1 keeps them)."""
    from megatron_tasp.options import env_flag

    if env_flag("VERBOSE"):
        return
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("megatron", "megatron.core", "torch.distributed.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)


def prepare_runtime() -> None:
    """Environment and imports every rank needs, done once (before forking on CPU)."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # CP on Hopper: issue order = execution order
    quiet_megatron()
    from megatron_tasp.megatron.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    # Import what the ranks use now, so forked workers start without importing anything.
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401

    import megatron_tasp.apps.finetune_lib.trainer  # noqa: F401
    import megatron_tasp.attention  # noqa: F401
    import megatron_tasp.megatron.spec  # noqa: F401
    quiet_megatron()  # imports above may have reset logger levels


def under_launcher() -> bool:
    """Whether this process is one rank started by torchrun (or another launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _want_cuda(recipe: Recipe) -> bool:
    import torch

    if recipe.parallel.device == "cpu":
        return False
    if recipe.parallel.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{recipe.source}: parallel.device: cuda but no CUDA device is visible")
    return torch.cuda.is_available()


def preflight(recipe: Recipe, world: int) -> None:
    """User-facing checks before any rank starts: layout, tokenizer vocabulary, corpus (tokenized into the cache)."""
    from megatron_tasp.apps.finetune_lib.data import open_dataset
    from megatron_tasp.apps.finetune_lib.tokenizer import build_tokenizer

    recipe.resolve_world(world)
    tok = build_tokenizer(recipe.tokenizer.type, recipe.tokenizer.name)
    open_dataset(recipe, tok, recipe.padded_vocab_size(tok.vocab_size))


def _init_process_group(cuda: bool) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))


@contextlib.contextmanager
def run_locks(recipe: Recipe, wait: bool = False) -> Iterator[None]:
    """Hold the output directory's lock (and the checkpoint directory's, when elsewhere) for the run."""
    from megatron_tasp.launch.lock import DirLock

    out = recipe.output_dir().resolve()
    locks = [DirLock(out, fix="choose another output directory (--output-dir DIR)")]
    ck = recipe.checkpoint_dir().resolve()
    if recipe.checkpoint.save and out not in (ck, *ck.parents):
        locks.append(DirLock(ck, what="checkpoint directory", fix="choose another checkpoint.dir"))
    held: list[Any] = []
    try:
        for lock in locks:
            try:
                held.append(lock.acquire(wait=wait))
            except OSError as exc:  # not LockHeld (a RuntimeError): the directory cannot be created or written
                raise RecipeError(f"{recipe.source}: cannot lock {lock.path}: {exc.strerror or exc}; choose a "
                                  f"writable {lock.what}") from None
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def run_this_rank(recipe: Recipe, opts: Any, wait_for_lock: bool = False, *,
                  take_locks: bool | None = None) -> dict[str, Any]:
    """Run as one rank of a torchrun/srun job (creates and destroys the default process group); rank 0 holds
    the run's directory locks unless ``take_locks`` says otherwise."""
    import torch.distributed as dist

    from megatron_tasp.apps.finetune_lib.trainer import run_training
    from megatron_tasp.launch.lifecycle import block_stop_signals, restore_mask

    if take_locks is None:
        take_locks = os.environ.get("RANK") == "0"
    with run_locks(recipe, wait_for_lock) if take_locks else contextlib.nullcontext():
        prepare_runtime()
        owns_group = not dist.is_initialized()
        mask = block_stop_signals()  # the communicator's threads never take SIGINT/SIGTERM; the trainer unblocks
        try:
            _init_process_group(_want_cuda(recipe))
            doc = run_training(recipe, opts)  # on an error, exit without a barrier: torchrun stops the others
        finally:
            restore_mask(mask)
        if owns_group:
            dist.barrier()
            dist.destroy_process_group()
    return doc


def run_single(recipe: Recipe, opts: Any) -> dict[str, Any]:
    """One rank in this process (no launcher needed)."""
    from megatron_tasp.launch import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    try:
        return run_this_rank(recipe, opts, take_locks=False)  # the caller holds them
    finally:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)


def _fork_worker(rank: int, world: int, recipe: Recipe, opts: Any) -> dict[str, Any]:
    import torch

    from megatron_tasp.apps.finetune_lib.trainer import run_training

    # one intra-op thread: an OpenMP thread pool does not survive fork, so a child that runs a parallel op after
    # its parent already did deadlocks (seen in the test suite); fork_launch already pins its ranks the same way
    torch.set_num_threads(1)
    quiet_megatron()
    return run_training(recipe, opts)


def run_forked(recipe: Recipe, opts: Any, world: int) -> dict[str, Any]:
    """``world`` forked gloo ranks on this machine; returns rank 0's metrics document."""
    from megatron_tasp.launch import WorkerError, run_workers

    prepare_runtime()
    try:
        results = run_workers(_fork_worker, world, recipe, opts, timeout_s=30 * 24 * 3600.0, forward_signals=True)
    except WorkerError as exc:  # a user error inside the ranks: one line, like the CLI's other errors
        for line in reversed(str(exc).splitlines()):
            for name in ("RecipeError", "CheckpointError"):
                if line.startswith("megatron_tasp.apps.finetune_lib.") and f"{name}: " in line:
                    raise RecipeError(line.split(f"{name}: ", 1)[1]) from exc
        raise
    return results[0]


def standalone_world_size(recipe: Recipe, cuda: bool) -> int:
    """Ranks to start without a launcher: tp*cp*dp; with dp null, all visible GPUs (a multiple of tp*cp) or 1 DP
    rank on CPU."""
    p = recipe.parallel
    if not cuda:
        return recipe.standalone_world_size
    import torch

    gpus, mp = torch.cuda.device_count(), p.tp * p.cp
    world = mp * p.dp if p.dp is not None else (gpus // mp) * mp
    if world == 0 or world > gpus:
        raise RecipeError(f"{recipe.source}: the recipe needs {max(world, mp)} GPUs (tp*cp*dp) but this node has "
                          f"{gpus}; launch it with torchrun/srun across nodes (scripts/slurm/) or lower parallel.cp "
                          "/ parallel.dp")
    return world


def torchrun_command(world: int, argv: list[str]) -> list[str]:
    """The command that re-runs ``megatron-tasp finetune <argv>`` as ``world`` ranks on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "megatron_tasp.cli", "finetune", *argv]


def _set_parent_death_signal() -> None:
    from megatron_tasp.launch.lifecycle import set_parent_death_signal

    set_parent_death_signal(signal.SIGTERM)  # torchrun stops its ranks on SIGTERM


def run_torchrun(world: int, argv: list[str]) -> int:
    """Re-run this command under torchrun; it dies with this process and gets the signals this one gets."""
    import subprocess

    cmd = torchrun_command(world, argv)
    logger.info("[finetune] starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, preexec_fn=_set_parent_death_signal)

    def forward(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def launch(recipe: Recipe, opts: Any, argv: list[str], launcher: str = "auto",
           wait_for_lock: bool = False) -> dict[str, Any] | None:
    """Run the recipe with the right number of ranks; returns rank 0's metrics (None after torchrun)."""
    if under_launcher():
        return run_this_rank(recipe, opts, wait_for_lock)
    cuda = _want_cuda(recipe)
    world = standalone_world_size(recipe, cuda)
    if launcher == "auto":
        launcher = "torchrun" if cuda and world > 1 else "fork"
    if launcher == "fork" and cuda and world > 1:
        raise RecipeError("--launcher fork cannot start CUDA ranks (CUDA does not survive fork); use --launcher "
                          "torchrun or start the job with torchrun yourself")
    if launcher == "torchrun" and world > 1:  # rank 0 takes the locks
        prepare_runtime()
        preflight(recipe, world)
        rc = run_torchrun(world, argv)
        if rc:
            raise SystemExit(rc)
        return None
    with run_locks(recipe, wait_for_lock):
        prepare_runtime()
        preflight(recipe, world)
        if world == 1:
            return run_single(recipe, opts)
        return run_forked(recipe, opts, world)


__all__ = ["LAUNCHERS", "launch", "preflight", "prepare_runtime", "quiet_megatron", "run_forked", "run_locks",
           "run_single", "run_this_rank", "run_torchrun", "standalone_world_size", "torchrun_command",
           "under_launcher"]
