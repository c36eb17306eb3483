"""Hugging Face weights inside ``megatron-tasp finetune``: ``checkpoint.pretrained: hf:DIR`` and
``checkpoint.export_hf: DIR``.

``hf:DIR`` checks the recipe's model section against ``DIR/config.json`` (the first differing field is named),
then converts once into ``<logging.output_dir>/hf_import/<name>-<hash>/`` (a normal Megatron distributed
checkpoint): global rank 0 reads the safetensors into its model, the other ranks receive the weights by broadcast
(TP = 1: every rank holds them all), and all ranks save the cache together. A later start with the same HF files,
vocabulary and dtype loads the cache like any ``checkpoint.pretrained`` directory.

``export_hf`` writes the final weights as an HF directory on rank 0 after the last save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_tasp.apps.hf.config import HFConfigError, check_recipe, hf_dir, hf_model, read_config

logger = logging.getLogger("megatron_tasp.finetune")


def _recipe_error(exc: Exception) -> Exception:
    from megatron_tasp.apps.finetune_lib.recipe import RecipeError

    return RecipeError(str(exc))


def _agree(value: str) -> str:
    """Rank 0's ``value`` on every rank."""
    obj = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(obj, src=0)
    return obj[0]


def load_pretrained_hf(run: Any) -> str:
    """Load ``checkpoint.pretrained: hf:DIR`` into ``run.core`` (collective); returns what was loaded."""
    from megatron_tasp.apps.finetune_lib import checkpoint as ckpt
    from megatron_tasp.apps.hf.convert import IMPORT_FORMAT, load_hf_weights
    from megatron_tasp.apps.hf.io import SafetensorsReader, fingerprint

    recipe, core = run.recipe, run.core
    src = hf_dir(recipe.checkpoint.pretrained)
    assert src is not None
    try:
        info = hf_model(read_config(src), where=f"{src / 'config.json'}")
        notes = check_recipe(recipe, info, run.vocab)
        dtype = str(next(core.parameters()).dtype).replace("torch.", "")
        key = hashlib.sha256(json.dumps([fingerprint(src), run.vocab, dtype]).encode()).hexdigest()[:12]
    except (HFConfigError, OSError) as exc:
        raise _recipe_error(exc) from None
    if notes and run.rank == 0:  # context extension: the weights load as they are, RoPE follows the recipe
        logger.info("[finetune] RoPE differs from %s (context extension): %s", src / "config.json", "; ".join(notes))
    key = _agree(key)  # ranks with their own copy of the HF directory (other mtimes) use rank 0's cache name
    cache = recipe.output_dir() / "hf_import" / f"{src.name or 'model'}-{key}"
    found = _agree(str(ckpt.find_checkpoint(cache) or "") if cache.is_dir() else "")
    if found:
        loaded = ckpt.load_checkpoint(Path(found), {"model": core.sharded_state_dict()})
        core.load_state_dict(loaded["model"], strict=True)
        logger.info("[finetune] %s: loaded the converted weights cached in %s", recipe.checkpoint.pretrained, found)
        return found
    error = ""
    if run.rank == 0:
        logger.info("[finetune] converting %s into %s", src, cache)
        try:
            with SafetensorsReader(src) as reader:
                load_hf_weights(core, reader, info.section, info.vocab_size, log=logger)
        except (HFConfigError, OSError) as exc:
            error = str(exc)
    error = _agree(error)  # every rank raises, none waits in the broadcast below
    if error:
        raise _recipe_error(HFConfigError(error)) from None
    with torch.no_grad():  # every rank holds all weights (TP = 1): rank 0's copy goes to all
        for p in core.parameters():
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(p.data, src=0)
    state = {"model": core.sharded_state_dict(), "recipe": recipe.to_dict(), "hf_config": info.config}
    marker = {"format": IMPORT_FORMAT, "hf_source": str(src.resolve()),
              "architecture": info.architecture, "hf_vocab_size": info.vocab_size}
    path = ckpt.save_checkpoint(cache, 0, state, marker, keep_last=1)
    return f"{recipe.checkpoint.pretrained} (converted into {path})"


def export_after_run(run: Any) -> Path:
    """Write ``run.core`` as a Hugging Face directory at ``checkpoint.export_hf`` (rank 0; collective barrier)."""
    from megatron_tasp.apps.hf.convert import export_model

    recipe = run.recipe
    out = Path(os.path.expanduser(os.path.expandvars(recipe.checkpoint.export_hf)))
    error = ""
    if run.rank == 0:
        src = hf_dir(recipe.checkpoint.pretrained)
        origin = src if src is not None and (src / "config.json").is_file() else None
        tok = recipe.tokenizer
        tok_dir = Path(tok.name).expanduser() if tok.type == "huggingface" and tok.name else None
        try:
            export_model(run.core, recipe, out, base_config=read_config(origin) if origin else None,
                         side_files_from=(origin, tok_dir if tok_dir is not None and tok_dir.is_dir() else None))
        except (HFConfigError, OSError, ImportError) as exc:
            error = f"{recipe.source}: checkpoint.export_hf: {exc}"
    error = _agree(error)
    if error:
        from megatron_tasp.apps.finetune_lib.recipe import RecipeError

        raise RecipeError(error)
    return out


__all__ = ["export_after_run", "load_pretrained_hf"]
