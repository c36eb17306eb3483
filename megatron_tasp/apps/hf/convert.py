"""Hugging Face weights <-> Megatron distributed checkpoints, through the fine-tuning app's own GPTModel.

Import builds the recipe's GPTModel (the builder ``megatron-tasp finetune`` uses), copies the HF tensors into
it (:mod:`.weights` layouts) and saves its ``sharded_state_dict()`` with the app's checkpoint writer, so the
result is exactly what ``checkpoint.pretrained`` loads, at any CP/DP layout (dist_checkpointing reshards).
Export loads such a checkpoint (or one written by ``megatron-tasp finetune``) into the same model and writes
safetensors + config.json. Letting Megatron's own model produce and consume the sharded keys keeps the files
correct across megatron-core versions and for both layer specs.

Standalone conversion runs as one CPU process: :func:`single_rank` creates a gloo world of 1 when no process group
exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_tasp.apps.hf.config import HFConfigError, HFModel, export_config, hf_dir, hf_model, read_config
from megatron_tasp.apps.hf.io import SafetensorsReader, copy_side_files, write_config, write_safetensors
from megatron_tasp.apps.hf.weights import (
    Layout,
    detect_naming,
    hf_to_megatron,
    megatron_names,
    megatron_to_hf,
    padding_note,
)

logger = logging.getLogger("megatron_tasp.hf")
IMPORT_FORMAT = "megatron-tasp-hf-import/1"
EMBEDDING = "embedding.word_embeddings.weight"
# Tensors an HF file may hold that carry no weights of their own (old RoPE caches; lm_head of tied models).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """A conversion cannot proceed; the message names the file or tensor and the fix."""


# ----- tensors <-> a live GPTModel --------------------------------------------------------------------------------

def _layout(core: torch.nn.Module, section: dict[str, Any], vocab: int, state: dict[str, Any]) -> Layout:
    if EMBEDDING not in state:
        raise ConversionError(f"the Megatron model has no {EMBEDDING} (pipeline stages are not supported)")
    return Layout.from_section(section, vocab=vocab, padded_vocab=int(state[EMBEDDING].shape[0]),
                               naming=detect_naming(state))


def load_hf_weights(core: torch.nn.Module, reader: SafetensorsReader, section: dict[str, Any], vocab: int,
                    log: logging.Logger = logger) -> None:
    """Copy the HF tensors of ``reader`` into ``core`` (a GPTModel of ``section``); every tensor on both sides
    must be used exactly once, and shapes must agree. A padded vocabulary is reported on ``log``."""
    state = core.state_dict(keep_vars=True)
    layout = _layout(core, section, vocab, state)
    have = {k for k, v in state.items() if not k.endswith("._extra_state") and v is not None}
    want = set(megatron_names(layout))
    if have != want:
        raise ConversionError(f"the Megatron model's tensors differ from the expected Llama layout: unexpected "
                              f"{sorted(have - want)[:4]}, missing {sorted(want - have)[:4]}")
    note = padding_note(layout.vocab, layout.padded_vocab)
    if note:
        log.warning("[hf] %s", note)
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        return reader.get(name)

    with torch.no_grad():
        for name, tensor in hf_to_megatron(get, layout):
            dst = state[name]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ConversionError(f"{reader.dir}: {name} built from the HF tensors has shape {tuple(tensor.shape)}"
                                      f", the model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
    unused = [k for k in reader.keys() if k not in used and not k.endswith(IGNORED_SUFFIXES)
              and not (layout.tied and k == "lm_head.weight")]
    if unused:
        raise ConversionError(f"{reader.dir}: {len(unused)} tensor(s) have no place in the model, e.g. "
                              f"{', '.join(sorted(unused)[:3])}; is config.json the one of these weights?")


def hf_tensors(core: torch.nn.Module, section: dict[str, Any], vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs of ``core``'s weights (vocabulary trimmed to ``vocab``)."""
    state = core.state_dict()
    return megatron_to_hf(state.__getitem__, _layout(core, section, vocab, state))


def export_model(core: torch.nn.Module, recipe: Any, out_dir: str | Path, *, base_config: dict[str, Any] | None = None,
                 side_files_from: tuple[str | Path | None, ...] = (), max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``core`` (a GPTModel of ``recipe``) as a Hugging Face directory; returns it."""
    out = Path(out_dir)
    section = dataclasses.asdict(recipe.model)
    state = core.state_dict()
    dtype = str(state[EMBEDDING].dtype).replace("torch.", "")
    padded = int(state[EMBEDDING].shape[0])
    cfg = export_config(section, padded, recipe.data.seq_length, base=base_config, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    files = write_safetensors(hf_tensors(core, section, int(cfg["vocab_size"])), out, max_shard_bytes)
    write_config(cfg, out)
    copied: list[str] = []
    for src in side_files_from:
        copied += [n for n in copy_side_files(src, out) if n not in copied]
    logger.info("[hf] wrote %s: %d weight file(s), config.json%s", out, len(files),
                f", {', '.join(copied)}" if copied else "")
    return out


# ----- one-process Megatron for the command line ------------------------------------------------------------------

@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """A gloo world of 1 and Megatron's parallel state (TP = CP = 1) for the duration (CPU conversion)."""
    import datetime

    import torch.distributed as dist

    from megatron_tasp.megatron.cpu_compat import enable_cpu_megatron, prepare_megatron_import

    prepare_megatron_import()
    enable_cpu_megatron()
    from megatron.core import parallel_state as ps

    from megatron_tasp.launch import free_port

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(hours=2))
    elif dist.get_world_size() != 1:
        raise ConversionError("conversion runs in one process; call it outside a multi-rank job")
    ps.initialize_model_parallel()
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        if own:
            dist.destroy_process_group()


def _build(recipe: Any, vocab: int, initialize: bool) -> torch.nn.Module:
    from megatron_tasp.apps.finetune_lib.model import build_model, transformer_config

    config = transformer_config(recipe, torch.device("cpu"))
    config.perform_initialization = initialize  # the weights are overwritten: skip the random init
    return build_model(recipe, config, vocab, torch.device("cpu"))[1]


def conversion_recipe(model_section: dict[str, Any], precision: str, hf_dir: str | Path, seq_length: int = 2) -> Any:
    """A minimal recipe holding ``model_section`` (CPU, one rank; the HF directory as tokenizer) for building the
    model."""
    from megatron_tasp.apps.finetune_lib.recipe import recipe_from_dict

    raw = {"name": "hf-conversion", "model": dict(model_section), "data": {"seq_length": seq_length},
           "tokenizer": {"type": "huggingface", "name": str(hf_dir)},
           "train": {"steps": 1, "precision": precision}, "parallel": {"device": "cpu"}}
    return recipe_from_dict(raw, source="<conversion>")


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto", vocab_multiple: int = 1) -> Path:
    """Convert an HF directory into a Megatron distributed checkpoint under ``out_dir`` (``iter_0000000`` and
    ``latest``, the layout ``checkpoint.pretrained`` reads); returns the checkpoint directory."""
    from megatron_tasp.apps.finetune_lib import checkpoint as ckpt

    info = hf_model(read_config(hf_dir), vocab_multiple, where=str(Path(hf_dir) / "config.json"))
    precision = {"auto": "bf16" if info.dtype == "bf16" else "fp32", "fp32": "fp32", "bf16": "bf16"}[dtype]
    recipe = conversion_recipe(info.section, precision, hf_dir)
    with SafetensorsReader(hf_dir) as reader, single_rank():
        core = _build(recipe, int(info.section["vocab_size"]), initialize=False)
        load_hf_weights(core, reader, info.section, info.vocab_size)
        state = {"model": core.sharded_state_dict(), "recipe": recipe.to_dict(), "hf_config": info.config}
        marker = {"format": IMPORT_FORMAT, "hf_source": str(Path(hf_dir).resolve()),
                  "architecture": info.architecture, "hf_vocab_size": info.vocab_size, "precision": precision}
        path = ckpt.save_checkpoint(Path(out_dir), 0, state, marker, keep_last=0)
    return path


def _export_recipe(raw: dict[str, Any], source: str) -> Any:
    """The saved recipe, laid out for one CPU rank (weights do not depend on the layout; TE keys equal local)."""
    from megatron_tasp.apps.finetune_lib.recipe import recipe_from_dict

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    raw["parallel"] = {"tp": 1, "cp": 1, "device": "cpu"}
    raw["model"]["spec"] = "local"
    raw.pop("logging", None)
    return recipe_from_dict(raw, source=source)


def mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, hf_config_dir: str | Path | None = None,
                max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the weights of a Megatron checkpoint (written by ``convert hf-to-mcore`` or ``megatron-tasp
    finetune``) as a Hugging Face directory. config.json comes from ``hf_config_dir``, else from the checkpoint's
    HF import, else from the run's ``hf:`` start, else it is generated from the recipe."""
    from megatron_tasp.apps.finetune_lib import checkpoint as ckpt

    path = Path(ckpt_dir)
    found = ckpt.find_checkpoint(path) if path.exists() else None
    if found is None:
        raise ConversionError(f"{path}: no Megatron checkpoint (expected a directory with 'latest' or metadata.json)")
    with single_rank():
        from megatron.core import dist_checkpointing

        common = dist_checkpointing.load_common_state_dict(str(found))
        if not isinstance(common.get("recipe"), dict):
            raise ConversionError(f"{found}: the checkpoint holds no recipe (it was not written by megatron-tasp), so "
                                  "the model shape is unknown")
        recipe = _export_recipe(common["recipe"], source=str(found))
        origin = _origin(recipe, found)
        sources = _side_sources(recipe, origin, hf_config_dir)
        base = _base_config(common, origin, hf_config_dir)
        meta = dist_checkpointing.load_tensors_metadata(str(found))
        if EMBEDDING not in meta:
            raise ConversionError(f"{found}: no {EMBEDDING} in the checkpoint")
        core = _build(recipe, int(meta[EMBEDDING].global_shape[0]), initialize=False)
        loaded = ckpt.load_checkpoint(found, {"model": core.sharded_state_dict()})
        core.load_state_dict(loaded["model"], strict=True)
        return export_model(core, recipe, out_dir, base_config=base, side_files_from=sources,
                            max_shard_bytes=max_shard_bytes)


def _origin(recipe: Any, found: Path) -> Path | None:
    """The HF directory the weights came from: the converter's source or the run's ``hf:`` start (if it exists)."""
    from megatron_tasp.apps.finetune_lib import checkpoint as ckpt
    source = ckpt.read_marker(found).get("hf_source")
    for cand in (Path(source) if source else None, hf_dir(recipe.checkpoint.pretrained)):
        if cand is not None and (cand / "config.json").is_file():
            return cand
    return None


def _side_sources(recipe: Any, origin: Path | None, hf_config_dir: str | Path | None) -> tuple[Any, ...]:
    """Directories whose generation and tokenizer files are copied: --hf-config, the origin, a local
    huggingface tokenizer."""
    tok = recipe.tokenizer
    local_tok = Path(tok.name).expanduser() if tok.type == "huggingface" and tok.name else None
    return hf_config_dir, origin, local_tok if local_tok is not None and local_tok.is_dir() else None


def _base_config(common: dict[str, Any], origin: Path | None, hf_config_dir: Any) -> dict[str, Any] | None:
    if hf_config_dir is not None:
        return read_config(hf_config_dir)
    if isinstance(common.get("hf_config"), dict):
        return dict(common["hf_config"])
    return read_config(origin) if origin is not None else None


__all__ = ["ConversionError", "HFConfigError", "HFModel", "IMPORT_FORMAT", "conversion_recipe", "export_model",
           "hf_tensors", "hf_to_mcore", "load_hf_weights", "mcore_to_hf", "single_rank"]
