"""``megatron-tasp finetune``: config-driven long-context fine-tuning on Megatron-Core with TASP context parallelism.

Usage::

    megatron-tasp finetune                                   # the embedded default recipe (CPU, CP=4, 4K tokens)
    megatron-tasp finetune CONFIG.yaml [KEY=VALUE ...] [--max-steps N] [--output-dir DIR]
    megatron-tasp finetune llama3-8b-128k-8xh100 --check     # validate a shipped recipe, print it resolved
    torchrun --nproc-per-node 8 -m megatron_tasp.cli finetune CONFIG.yaml    # one process per GPU

A recipe is a YAML file with the sections ``model``, ``tokenizer``, ``data``, ``parallel``, ``train``,
``checkpoint`` and ``logging`` (schema: ``megatron-tasp finetune --schema``, docs/FINETUNE.md). Overrides
``section.field=value`` are applied before validation (``train.lr=1e-4 parallel.cp=4``).

The model is Megatron-Core's GPTModel with TASP core attention (``gpt_tasp_local_spec``), initialised
with ``parallel_state`` (TP = 1, CP, DP), trained on GPUs with Megatron-Core's DDP, optimizer (distributed
over DP x CP by default), LR scheduler and micro-batch schedule (on CPU a small AdamW stand-in), and
checkpointed with ``megatron.core.dist_checkpointing`` (resumable exactly, loadable at another CP size,
never damaged by an interrupted save). Under torchrun/srun every process is one rank; otherwise the
command starts the ranks itself (forked gloo workers on CPU, torchrun on GPUs).

Recipe schema (generated from the code; see also docs/FINETUNE.md)::

"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_tasp.apps.finetune_lib.recipe import (
    DEFAULT_RECIPE,
    RecipeError,
    list_recipes,
    load_recipe,
    schema_text,
)

__doc__ += "\n".join("    " + line for line in schema_text().splitlines()) + "\n"

DESCRIPTION = """\
Fine-tune a GPT at long context on Megatron-Core with TASP (topology-aware multi-ring) context parallelism.

CONFIG is a recipe YAML file or the name of a shipped recipe; without it (or with --default) the embedded
default recipe runs: a small byte-level GPT trained at 4096 tokens per sequence with CP=4 TASP on
CPU/gloo, on Python's standard-library sources (from random initialisation, a few minutes on 2 cores).
KEY=VALUE arguments override recipe fields before validation, e.g. train.lr=1e-4 parallel.cp=2.
"""

EPILOG = """\
examples:
  megatron-tasp finetune                                     run the default recipe (CPU, CP=4)
  megatron-tasp finetune --default --max-steps 10 logging.output_dir=/tmp/ft
  megatron-tasp finetune my.yaml train.lr=1e-4 parallel.cp=2 checkpoint.interval=50
  megatron-tasp finetune llama3-8b-128k-8xh100 --check       validate a recipe and print it resolved
  megatron-tasp finetune --schema                            every recipe field, default and meaning
  torchrun --nproc-per-node 8 -m megatron_tasp.cli finetune llama3-8b-128k-8xh100
  sbatch scripts/slurm/finetune_multinode.sbatch configs/recipes/llama3-8b-128k-2x8xh100.yaml

launching: under torchrun/srun (RANK and WORLD_SIZE set) each process is one rank and the world size must be
tp*cp*dp; otherwise finetune starts tp*cp*(dp or 1) ranks itself: forked gloo workers on CPU, torchrun on GPUs.
checkpoints: <output_dir>/checkpoints/iter_NNNNNNN (Megatron dist_checkpointing), 'latest' names the newest
complete one; checkpoint.resume=auto continues from it (exactly: model, optimizer, step, data position, RNG).
outputs: metrics.json (per-step loss, lr, grad norm, tokens/s; held-out loss, by position bucket; passkey accuracy
with passkey.lengths), loss.png and long_context.png in the output dir.
stopping: Ctrl-C or SIGTERM stops every rank after the current step, saves a checkpoint and prints the command
that resumes (exit 130 / 143); a second Ctrl-C stops at once. One run per output dir (a lock file); a rank that
dies stops the run with one line naming it, the last checkpoint and the resume command (exit 1).
"""


class _ConsoleHandler(logging.Handler):
    """The run's log lines on stdout, through tqdm's writer when tqdm is installed (it keeps a bar intact)."""

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        msg = self.format(record)
        try:
            from tqdm import tqdm
        except ImportError:
            print(msg, flush=True)
            return
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def configure_logging(quiet: bool) -> None:
    """Send the ``megatron_tasp.finetune`` logger to stdout (once per process)."""
    log = logging.getLogger("megatron_tasp.finetune")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        log.addHandler(_ConsoleHandler())
        log.propagate = False


class _IntermixedParser(argparse.ArgumentParser):
    """Lets KEY=VALUE overrides come before or after options (``finetune CFG --max-steps 3 train.lr=1e-4``)."""

    _nested = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # noqa: D102
        if self._nested:
            return super().parse_known_args(args, namespace)
        self._nested = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._nested = False


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The finetune options (shared by the CLI subcommand and ``python -m megatron_tasp.apps.finetune``)."""
    p.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE",
                   help=f"recipe YAML file or shipped recipe name ({', '.join(list_recipes())}), then "
                        "section.field=value overrides (YAML values: 1e-4, true, null, [0.9,0.95])")
    p.add_argument("--default", action="store_true",
                   help=f"run the embedded default recipe ({DEFAULT_RECIPE}); the same as giving no CONFIG")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop once N optimizer steps have run in total (a checkpoint is saved there when "
                        "checkpointing is on); the LR schedule still spans train.steps, so a later run resumes")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="shorthand for logging.output_dir=DIR")
    p.add_argument("--hf-export", default=None, metavar="DIR",
                   help="shorthand for checkpoint.export_hf=DIR: end by writing the weights as a Hugging Face "
                        "directory (safetensors + config.json)")
    p.add_argument("--launcher", choices=("auto", "fork", "torchrun"), default="auto",
                   help="how to start ranks when not under torchrun/srun: fork (CPU), torchrun (one per GPU), "
                        "auto (torchrun on GPUs, fork on CPU)")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe (and overrides), print it resolved with derived sizes, and exit")
    p.add_argument("--schema", action="store_true", help="print every recipe field with its default and exit")
    p.add_argument("--list", dest="list_recipes", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--wait-for-lock", action="store_true",
                   help="when another run holds the output directory, wait for it to end instead of refusing")
    return p


def register(sub: Any) -> None:
    """Add the ``finetune`` subcommand to the ``megatron-tasp`` CLI."""
    original = sub._parser_class
    sub._parser_class = _IntermixedParser
    try:
        p = sub.add_parser("finetune", help="config-driven long-context fine-tuning (Megatron-Core + TASP)",
                           description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    finally:
        sub._parser_class = original
    add_arguments(p)
    p.set_defaults(func=cmd_finetune)


def split_items(items: list[str], default: bool) -> tuple[str | None, list[str]]:
    """Separate CONFIG (at most one, no '=') from KEY=VALUE overrides."""
    configs = [x for x in items if "=" not in x]
    overrides = [x for x in items if "=" in x]
    if len(configs) > 1:
        raise RecipeError(f"give at most one CONFIG (got {', '.join(configs)}); overrides look like "
                          "section.field=value")
    if configs and default:
        raise RecipeError(f"--default runs the embedded recipe; drop it or drop CONFIG {configs[0]}")
    return (configs[0] if configs else None), overrides


def describe(recipe: Any) -> str:
    """Derived sizes of a validated recipe (for --check)."""
    from megatron_tasp.apps.finetune_lib.model import estimate_parameters

    p, t, d = recipe.parallel, recipe.train, recipe.data
    vocab = recipe.padded_vocab_size(256) if recipe.tokenizer.type == "byte" else None
    lines = [f"# recipe {recipe.name} ({recipe.source}) is valid",
             f"# world size {recipe.standalone_world_size if p.dp else f'{p.tp * p.cp} x dp'} = tp {p.tp} x cp "
             f"{p.cp} x dp {p.dp or '(world / tp*cp)'}; {d.seq_length // p.cp:,} tokens of each sequence per CP "
             f"rank; {t.global_batch * d.seq_length:,} tokens per step"]
    if vocab is not None:
        n = estimate_parameters(recipe, vocab)
    elif isinstance(recipe.model.vocab_size, int):
        n = estimate_parameters(recipe, recipe.model.vocab_size)
    else:
        n = None
    if n is not None:
        world = p.cp * (p.dp or 1)
        dtype_bytes = 2 if t.precision == "bf16" else 4
        sharded = t.distributed_optimizer and p.device != "cpu"  # Megatron's distributed optimizer (GPU)
        per_rank = n * (2 * dtype_bytes) + 12 * n / (world if sharded else 1)
        kind = "sharded optimizer" if sharded else "optimizer"
        lines.append(f"# ~{n / 1e9:.3f}B parameters; weights+grads+{kind} ~{per_rank / 2**30:.1f} GiB "
                     f"per rank (activations extra; recompute: {t.recompute})")
    return "\n".join(lines)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Entry point of ``megatron-tasp finetune``."""
    t0 = time.perf_counter()
    if args.schema:
        print(schema_text(), end="")
        return 0
    if args.list_recipes:
        for name in list_recipes():
            print(name)
        return 0
    config, overrides = split_items(list(args.items), args.default)
    if args.output_dir:
        overrides.append(f"logging.output_dir={args.output_dir}")
    if args.hf_export:
        overrides.append(f"checkpoint.export_hf={args.hf_export}")
    if args.quiet:
        overrides.append("logging.progress_bar=false")
    if args.max_steps is not None and args.max_steps < 0:
        raise RecipeError(f"--max-steps must be >= 0, got {args.max_steps}")
    recipe = load_recipe(config, overrides)
    if args.check:
        print(describe(recipe))
        print(recipe.to_yaml(), end="")
        return 0
    configure_logging(args.quiet)
    from megatron_tasp.apps.finetune_lib.launch import launch, under_launcher
    from megatron_tasp.apps.finetune_lib.trainer import RunOptions
    from megatron_tasp.launch import WorkerError
    from megatron_tasp.launch.lock import LockHeld

    argv = [recipe.source, *overrides]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    if args.quiet:
        argv.append("--quiet")
    if args.wait_for_lock:
        argv.append("--wait-for-lock")
    resume = resume_command(config, overrides, recipe, args)
    opts = RunOptions(max_steps=args.max_steps, log=not args.quiet)
    with _sigterm_raises():
        try:
            doc = launch(recipe, opts, argv, args.launcher, wait_for_lock=args.wait_for_lock)
        except LockHeld as exc:
            _say(f"megatron-tasp finetune: error: {exc}")
            return 2
        except WorkerError as exc:
            return _report_failure(exc, recipe, resume)
        except (KeyboardInterrupt, _Terminated) as exc:
            signum = signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT
            _say(f"[finetune] stopped by {signal.Signals(signum).name} before training started; nothing was saved")
            return 128 + signum
    if doc is not None and doc.get("stopped_by"):
        return _report_stop(doc, recipe, resume)
    if doc is not None and not args.quiet and not under_launcher():
        print(f"[finetune] total wall time {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


class _Terminated(Exception):
    """SIGTERM while no run is under way yet (before the ranks install their own handlers)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` in this process (main thread only) while the run starts."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _say(line: str) -> None:
    """A user-facing status line on stderr (rank 0 only under torchrun/srun)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def _prog() -> list[str]:
    """How this command was started: the console script, or ``python -m ...``."""
    first = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if first == "cli.py":
        return [sys.executable, "-m", "megatron_tasp.cli", "finetune"]
    if first == "finetune.py":
        return [sys.executable, "-m", "megatron_tasp.apps.finetune"]
    return ["megatron-tasp", "finetune"]


def resume_command(config: str | None, overrides: list[str], recipe: Any, args: argparse.Namespace) -> str:
    """The command that continues this run from its newest checkpoint (checkpoint.resume=auto)."""
    from megatron_tasp.apps.finetune_lib.launch import under_launcher

    if under_launcher():  # a rank of a torchrun/srun job: the job's own command is what resumes
        return "the same torchrun/srun command" + ("" if recipe.checkpoint.resume == "auto" else
                                                   " with checkpoint.resume=auto")
    words = _prog() + ([config] if config else [])
    words += [o for o in overrides if not o.startswith("checkpoint.resume=")]
    if recipe.checkpoint.resume != "auto":
        words.append("checkpoint.resume=auto")
    if args.max_steps is not None:
        words += ["--max-steps", str(args.max_steps)]
    if args.quiet:
        words.append("--quiet")
    if args.launcher != "auto":
        words += ["--launcher", args.launcher]
    return shlex.join(words)


def _last_checkpoint(recipe: Any) -> str | None:
    from megatron_tasp.apps.finetune_lib.checkpoint import CheckpointError, find_checkpoint

    try:
        found = find_checkpoint(recipe.checkpoint_dir())
    except (CheckpointError, OSError):
        return None
    return str(found) if found is not None else None


def _report_stop(doc: dict[str, Any], recipe: Any, resume: str) -> int:
    signum = signal.Signals[doc["stopped_by"]]
    ck = _last_checkpoint(recipe)
    _say(f"[finetune] stopped by {signum.name} at step {doc['end_step']} of {doc['train_steps']}")
    _say(f"[finetune] checkpoint: {ck}" if ck else "[finetune] no checkpoint was saved (checkpoint.save is off or "
         "no step ran); the command below starts over")
    _say(f"[finetune] resume with: {resume}")
    return 128 + int(signum)


def _report_failure(exc: Any, recipe: Any, resume: str) -> int:
    from megatron_tasp.options import env_flag

    _say(f"megatron-tasp finetune: error: {exc.summary}; the other ranks were stopped")
    if env_flag("VERBOSE"):
        _say(str(exc))
    elif exc.failures and exc.failures[0].error:  # the cause is an exception (not a killed rank)
        _say("[finetune] MEGATRON_TASP_VERBOSE=1 shows the ranks' tracebacks")
    ck = _last_checkpoint(recipe)
    _say(f"[finetune] last checkpoint: {ck}" if ck else "[finetune] no checkpoint was saved yet")
    _say(f"[finetune] {'resume' if ck else 'start again'} with: {resume}")
    return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_tasp.apps.finetune ...`` (same options as ``megatron-tasp finetune``)."""
    parser = add_arguments(_IntermixedParser(prog="megatron-tasp finetune", description=DESCRIPTION, epilog=EPILOG,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return cmd_finetune(args)
    except (RecipeError, FileNotFoundError) as exc:
        print(f"megatron-tasp finetune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
