"""``megatron-tasp preprocess``: tokenize a corpus into a Megatron indexed dataset (``.bin``/``.idx``).

The documents are read exactly as ``megatron-tasp finetune`` reads them (the recipe's ``data`` section: a
standard-library, text-file or JSON-lines source, ``data.text_field``, ``data.max_bytes``) and tokenized with the
recipe's tokenizer, each followed by its end-of-document id; Megatron-Core's ``IndexedDatasetBuilder`` writes
one sequence per document. Train on it with ``data.source: indexed`` and ``data.path: PREFIX``::

    megatron-tasp preprocess my.yaml --input 'raw/*.jsonl' --output data/corpus
    megatron-tasp finetune my.yaml data.source=indexed data.path=data/corpus
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from megatron_tasp.apps.finetune_lib.recipe import DEFAULT_RECIPE, Recipe, RecipeError, load_recipe

EPILOG = """\
examples:
  megatron-tasp preprocess --input docs.jsonl --output data/docs          default recipe's tokenizer (bytes)
  megatron-tasp preprocess my.yaml --input 'raw/*.jsonl' --output data/corpus data.text_field=body
  megatron-tasp preprocess my.yaml data.source=files data.path='books/**/*.txt' --output data/books
then train with data.source=indexed data.path=PREFIX (several prefixes: a list, blended by data.weights).
"""


def write_indexed(recipe: Recipe, tokenizer: Any, prefix: str) -> tuple[int, int]:
    """Write the recipe's documents to ``prefix.bin`` / ``prefix.idx`` (atomically, the index last); returns
    ``(documents, tokens)``."""
    from megatron_tasp.apps.finetune_lib.data import iter_token_documents
    from megatron_tasp.apps.finetune_lib.indexed import indexed_dataset_class

    indexed_dataset_class()  # megatron.core imports cleanly on CPU-only machines from here on
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = f"{prefix}.bin.{os.getpid()}.tmp", f"{prefix}.idx.{os.getpid()}.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=DType.optimal_dtype(tokenizer.vocab_size))
    docs = tokens = 0
    try:
        for ids, _ in iter_token_documents(recipe, tokenizer):
            builder.add_document(ids, [int(ids.size)])
            docs, tokens = docs + 1, tokens + int(ids.size)
        builder.finalize(tmp_idx)
        if not docs:
            raise RecipeError(f"{recipe.source}: the corpus is empty (check data.path / data.max_bytes)")
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        for tmp in (tmp_bin, tmp_idx):
            if os.path.exists(tmp):
                os.remove(tmp)
    return docs, tokens


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Entry point of ``megatron-tasp preprocess``."""
    from megatron_tasp.apps.finetune_lib.launch import quiet_megatron
    from megatron_tasp.apps.finetune_lib.tokenizer import build_tokenizer

    quiet_megatron()
    configs = [x for x in args.items if "=" not in x]
    overrides = [x for x in args.items if "=" in x]
    if len(configs) > 1:
        raise RecipeError(f"give at most one CONFIG (got {', '.join(configs)}); overrides look like "
                          "section.field=value")
    if args.input:
        overrides += ["data.source=jsonl", f"data.path={json.dumps(list(args.input))}", "data.weights=null"]
    recipe = load_recipe(configs[0] if configs else None, overrides)
    if recipe.data.source == "indexed":
        raise RecipeError(f"{recipe.source}: data.source is indexed already; give the text to tokenize with "
                          "--input FILE.jsonl (or data.source=files data.path=...)")
    if recipe.data.format != "text":
        raise RecipeError(f"{recipe.source}: data.format: {recipe.data.format}: indexed datasets hold no loss mask; "
                          "train SFT data from its jsonl (data.source: jsonl)")
    tokenizer = build_tokenizer(recipe.tokenizer.type, recipe.tokenizer.name)
    prefix = os.path.expanduser(os.path.expandvars(args.output))
    docs, tokens = write_indexed(recipe, tokenizer, prefix)
    print(f"[preprocess] {docs:,} documents, {tokens:,} tokens ({tokenizer.name}) -> {prefix}.bin, {prefix}.idx; "
          f"train on it with data.source=indexed data.path={prefix}")
    return 0


def register(sub: Any) -> None:
    """Add the ``preprocess`` subcommand to the ``megatron-tasp`` CLI."""
    p = sub.add_parser("preprocess", help="tokenize documents into a Megatron indexed dataset (.bin/.idx)",
                       description=__doc__.split("\n\n")[0] + " The documents and the tokenizer come from a "
                       f"fine-tuning recipe (CONFIG; default: {DEFAULT_RECIPE}) and its overrides.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE",
                   help="recipe YAML file or shipped recipe name, then section.field=value overrides")
    p.add_argument("--input", action="append", metavar="PATH",
                   help="JSON-lines file or glob to tokenize (repeatable; data.text_field names the text); "
                        "default: the recipe's data.source and data.path")
    p.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.set_defaults(func=cmd_preprocess)


__all__ = ["cmd_preprocess", "register", "write_indexed"]
