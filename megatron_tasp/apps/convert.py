"""``megatron-tasp convert``: Hugging Face Llama-family weights <-> Megatron distributed checkpoints.

Usage::

    megatron-tasp convert hf-to-mcore HF_DIR OUT_DIR [--dtype auto|fp32|bf16] [--vocab-multiple 1]
    megatron-tasp convert hf-to-mcore HF_DIR --print-section      # only the recipe model section (no Megatron)
    megatron-tasp convert mcore-to-hf CKPT_DIR OUT_DIR [--hf-config HF_DIR] [--max-shard-gb 5]

Conversion runs in this one process on the CPU. Errors end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from megatron_tasp.apps.hf.config import SUPPORTED

DESCRIPTION = """\
Convert Hugging Face Llama-family weights (LlamaForCausalLM: Llama 2, 3, 3.1, 3.2; MistralForCausalLM without a
sliding window; Qwen2ForCausalLM; RoPE scaling linear, llama3 or yarn) to a Megatron distributed checkpoint that
megatron-tasp finetune loads with checkpoint.pretrained: OUT_DIR at any CP/DP layout, and back. Runs in one CPU
process."""

EPILOG_IMPORT = """\
The recipe model section matching config.json is printed on stdout (paste it into the recipe). Instead of
converting ahead, a recipe may say checkpoint.pretrained: hf:HF_DIR, which converts on the fly and checks that
the model section matches. Weights are read from model.safetensors or model.safetensors.index.json (shards).
"""

EPILOG_EXPORT = """\
CKPT_DIR is a directory written by 'convert hf-to-mcore' or by megatron-tasp finetune (its checkpoints dir, or
one iter_NNNNNNN). config.json comes from --hf-config, else from the HF directory the weights came from, else it
is generated from the recipe saved in the checkpoint (LlamaForCausalLM, or Qwen2ForCausalLM for QKV-only biases).
generation_config.json and tokenizer files are copied from those directories when present.
"""


def register(sub: Any) -> None:
    """Add the ``convert`` subcommand to the ``megatron-tasp`` CLI."""
    p = sub.add_parser("convert", help="Hugging Face Llama-family weights <-> Megatron distributed checkpoints",
                       description=DESCRIPTION)
    conv = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    imp = conv.add_parser("hf-to-mcore", help="HF safetensors directory -> Megatron torch_dist checkpoint",
                          description=DESCRIPTION, epilog=EPILOG_IMPORT,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory (config.json + safetensors)")
    imp.add_argument("out_dir", metavar="OUT_DIR", nargs="?",
                     help="where the checkpoint goes (OUT_DIR/iter_0000000 and OUT_DIR/latest)")
    imp.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                     help="weight dtype in the checkpoint: auto (bf16 when config.json says bfloat16, else fp32)")
    imp.add_argument("--vocab-multiple", type=int, default=1, metavar="N",
                     help="pad the vocabulary to a multiple of N with zero rows (default 1: no padding; padded rows "
                          "take part in Megatron's softmax, so the loss is exact only without padding)")
    imp.add_argument("--print-section", action="store_true",
                     help="only print the recipe model section for config.json and exit (OUT_DIR not needed)")
    imp.set_defaults(func=cmd_hf_to_mcore)
    exp = conv.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF safetensors + config.json",
                          description=DESCRIPTION, epilog=EPILOG_EXPORT,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("ckpt_dir", metavar="CKPT_DIR", help="checkpoint directory (with 'latest') or one iter_NNNNNNN")
    exp.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face directory to write")
    exp.add_argument("--hf-config", metavar="HF_DIR", default=None,
                     help="directory with the config.json to write (its vocab_size trims the padded vocabulary)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, metavar="GB",
                     help="largest safetensors file; bigger models are written as shards with an index (default 5)")
    exp.set_defaults(func=cmd_mcore_to_hf)


def _configure_logging() -> None:
    """Conversion notes on stderr; Megatron's import-time warnings silenced (MEGATRON_TASP_VERBOSE=1 keeps them)."""
    from megatron_tasp.apps.finetune_lib.launch import quiet_megatron

    quiet_megatron()
    log = logging.getLogger("megatron_tasp.hf")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _one_line(exc: BaseException) -> ValueError:
    """Errors of the conversion as the CLI's one-line ValueError."""
    from megatron_tasp.apps.hf.convert import ConversionError

    return ConversionError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def cmd_hf_to_mcore(args: argparse.Namespace) -> int:
    """``convert hf-to-mcore``."""
    from megatron_tasp.apps.hf.config import hf_model, read_config, section_yaml

    if args.vocab_multiple < 1:
        raise ValueError(f"--vocab-multiple must be >= 1, got {args.vocab_multiple}")
    info = hf_model(read_config(args.hf_dir), args.vocab_multiple, where=f"{args.hf_dir}/config.json")
    if args.print_section:
        print(section_yaml(info), end="")
        return 0
    if not args.out_dir:
        raise ValueError("give OUT_DIR (or --print-section to only print the recipe model section)")
    _configure_logging()
    from megatron_tasp.apps.finetune_lib.checkpoint import CheckpointError
    from megatron_tasp.apps.hf.convert import hf_to_mcore

    try:
        path = hf_to_mcore(args.hf_dir, args.out_dir, dtype=args.dtype, vocab_multiple=args.vocab_multiple)
    except (CheckpointError, ImportError, OSError) as exc:
        raise _one_line(exc) from None
    print(section_yaml(info), end="")
    print(f"wrote {path} ({info.architecture}); start a fine-tune from it with checkpoint.pretrained: "
          f"{args.out_dir} and the model section above", file=sys.stderr)
    return 0


def cmd_mcore_to_hf(args: argparse.Namespace) -> int:
    """``convert mcore-to-hf``."""
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    _configure_logging()
    from megatron_tasp.apps.finetune_lib.checkpoint import CheckpointError
    from megatron_tasp.apps.hf.convert import mcore_to_hf

    try:
        out = mcore_to_hf(args.ckpt_dir, args.out_dir, hf_config_dir=args.hf_config,
                          max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (CheckpointError, ImportError, OSError) as exc:
        raise _one_line(exc) from None
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    return 0


__all__ = ["SUPPORTED", "cmd_hf_to_mcore", "cmd_mcore_to_hf", "register"]
