"""Megatron-LM's ``pretrain_gpt.py`` with ``--context-parallel-backend`` and the ``--tasp-*`` flags, unpatched.

Usage (Megatron-LM 0.19 checkout, megatron-core >= 0.19)::

    export MEGATRON_LM_PATH=/path/to/Megatron-LM      # or put the checkout on PYTHONPATH
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    torchrun --nproc-per-node 8 -m megatron_tasp.megatron.pretrain_gpt [Megatron-LM args] \\
        --context-parallel-size 8 --context-parallel-backend tasp --attention-dropout 0.0 \\
        [--tasp-topology h100-sxm-8] [--tasp-num-rings auto]

It imports ``pretrain_gpt`` from the checkout and repeats its ``__main__`` (0.19: ``pretrain()`` takes no
extra-args provider, so arguments are parsed with ``parse_and_validate_args(extra_args_provider=...)``),
adding the flags, validating them before Megatron's own checks (``args.tasp_options``), and swapping TASP
core attention with those options into the decoder (and MTP) spec when TASP is selected
(``megatron_tasp.megatron.lm.install_tasp_model_config``). With TASP selected, packed (THD) batches of
``get_batch`` are split over CP ranks with TASP's partition instead of Transformer Engine's
(``megatron_tasp.megatron.thd_batch.install_thd_batch_partition``: same layout, no TE), and their RoPE runs
without host synchronisation (``megatron_tasp.megatron.thd_rope.install_thd_rope``: same result). These two
are the monkeypatches here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_ENTRY_TIME = time.time()


class MegatronLMNotFound(ImportError):
    """pretrain_gpt.py of a Megatron-LM checkout could not be imported."""


def import_pretrain_gpt() -> Any:
    """Import ``pretrain_gpt`` from $MEGATRON_LM_PATH or sys.path; raise MegatronLMNotFound otherwise."""
    root = os.environ.get("MEGATRON_LM_PATH")
    if root:
        if not os.path.isfile(os.path.join(root, "pretrain_gpt.py")):
            raise MegatronLMNotFound(f"MEGATRON_LM_PATH={root} has no pretrain_gpt.py; point it at the root of a "
                                     "Megatron-LM checkout (git clone https://github.com/NVIDIA/Megatron-LM)")
        if root not in sys.path:
            sys.path.insert(0, root)
    if importlib.util.find_spec("pretrain_gpt") is None:
        raise MegatronLMNotFound(
            "cannot find Megatron-LM's pretrain_gpt.py: set MEGATRON_LM_PATH to the root of a Megatron-LM "
            "checkout (matching your megatron-core version, e.g. tag core_v0.19.0) or add it to PYTHONPATH")
    return importlib.import_module("pretrain_gpt")


def _chain(*providers: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    def provider(parser: Any) -> Any:
        for p in providers:
            if p is not None:
                parser = p(parser)
        return parser

    return provider


def parse_args_with_tasp(extra_args_provider: Callable[[Any], Any] | None = None,
                         args_defaults: dict[str, Any] | None = None) -> Any:
    """Megatron-LM's ``parse_and_validate_args`` with the TASP flags, validated before Megatron's checks."""
    import megatron.training.arguments as margs

    from megatron_tasp.megatron.args import add_tasp_args, validate_tasp_args

    original_validate = margs.validate_args
    state = {"done": False}

    def validate_args(args: Any, defaults: Any = None) -> Any:
        validate_tasp_args(args)
        state["done"] = True
        return original_validate(args, {} if defaults is None else defaults)

    margs.validate_args = validate_args
    try:
        args = margs.parse_and_validate_args(extra_args_provider=_chain(extra_args_provider, add_tasp_args),
                                             args_defaults=args_defaults or {})
    finally:
        margs.validate_args = original_validate
    if not state["done"]:  # e.g. --yaml-cfg takes another validation path
        validate_tasp_args(args)
    return args


def main() -> None:
    """Run Megatron-LM GPT pretraining with the context-parallel backend flags."""
    pg = import_pretrain_gpt()
    from megatron.core.enums import ModelType

    from megatron_tasp.megatron.lm import install_tasp_model_config
    from megatron_tasp.megatron.thd_batch import install_thd_batch_partition
    from megatron_tasp.megatron.thd_rope import install_thd_rope

    set_startup_timestamps = getattr(pg, "set_startup_timestamps", None)
    if set_startup_timestamps is not None and hasattr(pg, "_PROGRAM_START_TIME"):
        set_startup_timestamps(program_start=pg._PROGRAM_START_TIME, main_entry=_ENTRY_TIME)
    pg.train_valid_test_datasets_provider.is_distributed = True
    pretrain, store = pg.inprocess_restart.maybe_wrap_for_inprocess_restart(pg.pretrain)

    has_modelopt = bool(getattr(pg, "has_nvidia_modelopt", False))
    args = parse_args_with_tasp(extra_args_provider=pg.add_modelopt_args if has_modelopt else None,
                                args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    if has_modelopt:
        pg.maybe_enable_modelopt(args)
    if has_modelopt and getattr(args, "modelopt_enabled", False):
        model_cfg = pg.gpt_config_from_args(args, model_config_cls=pg.ModelOptModelConfig)
    else:
        model_cfg = pg.gpt_config_from_args(args)
    if args.tasp_enabled:
        install_tasp_model_config(model_cfg, args)
        install_thd_batch_partition()  # packed (--sft) batches: TASP's per-document CP split, no TE needed
        install_thd_rope()  # packed RoPE without Megatron-Core's host reads (same result)
    full_config = pg.pretrain_cfg_container_from_args(args, model_cfg)
    pretrain(full_config, pg.train_valid_test_datasets_provider, ModelType.encoder_or_decoder, pg.forward_step,
             store=store, get_embedding_ranks=pg.get_embedding_ranks)


if __name__ == "__main__":
    try:
        main()
    except MegatronLMNotFound as exc:
        sys.exit(f"megatron_tasp.megatron.pretrain_gpt: {exc}")
