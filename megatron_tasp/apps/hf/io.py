"""Reading and writing Hugging Face model directories: safetensors weights (one file, or shards with
``model.safetensors.index.json``), tokenizer and generation files.

``safetensors`` is imported inside the functions (``pip install safetensors``, the ``hf`` extra); tensors are
read one at a time from memory-mapped files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megatron_tasp.apps.hf.config import HFConfigError

logger = logging.getLogger("megatron_tasp.hf")

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
GENERATION = "generation_config.json"


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError as exc:
        raise ImportError("reading and writing Hugging Face weights needs safetensors: pip install safetensors "
                          "(or pip install 'megatron-tasp[hf]')") from exc
    return safetensors


class SafetensorsReader:
    """The tensors of an HF model directory by name, opened lazily (use as a context manager)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self._handles: dict[Path, Any] = {}
        index, single = self.dir / INDEX, self.dir / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise HFConfigError(f"{index}: not a safetensors index (no weight_map: {exc})") from None
            self.files = {str(k): self.dir / str(v) for k, v in weight_map.items()}
            missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
            if missing:
                raise HFConfigError(f"{index} names missing shard(s): {', '.join(missing)}")
        elif single.is_file():
            self.files = {str(k): single for k in self._open(single).keys()}
        else:
            other = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
            hint = (f" (found {', '.join(other)}: re-save the model with save_pretrained(safe_serialization=True))"
                    if other else "")
            raise HFConfigError(f"{self.dir}: no {SINGLE} or {INDEX}{hint}")

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = _safetensors().safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def keys(self) -> list[str]:
        """Every tensor name."""
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor (raises HFConfigError naming it when absent)."""
        path = self.files.get(name)
        if path is None:
            raise HFConfigError(f"{self.dir}: tensor {name} is missing from the safetensors files")
        return self._open(path).get_tensor(name)

    def close(self) -> None:
        """Drop the file handles."""
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                      max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write ``(name, tensor)`` pairs as ``model.safetensors`` or as shards plus ``model.safetensors.index.json``
    (HF's names: ``model-00001-of-00003.safetensors``); returns the files written."""
    st = _safetensors()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / SINGLE, out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    shards: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size, total = 0, 0

    def flush() -> None:
        path = out / f".shard-{len(shards):05d}.tmp"
        st.torch.save_file(current, str(path), metadata={"format": "pt"})
        shards.append((path, list(current)))
        current.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = tensor.detach().to("cpu").contiguous().clone()  # no shared storage (tied weights)
        size += nbytes
        total += nbytes
    if current or not shards:
        flush()
    if len(shards) == 1:
        final = out / SINGLE
        os.replace(shards[0][0], final)
        return [final]
    n = len(shards)
    written, weight_map = [], {}
    for i, (tmp, names) in enumerate(shards, start=1):
        final = out / f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, final)
        written.append(final)
        weight_map.update({name: final.name for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*written, out / INDEX]


def copy_side_files(src: str | Path | None, dst: str | Path, tokenizer: bool = True) -> list[str]:
    """Copy ``generation_config.json`` and (when ``tokenizer``) the tokenizer files present in ``src``."""
    if src is None or not Path(src).is_dir():
        return []
    names = (GENERATION, *TOKENIZER_FILES) if tokenizer else (GENERATION,)
    copied = []
    for name in names:
        path = Path(src) / name
        if path.is_file():
            shutil.copyfile(path, Path(dst) / name)
            copied.append(name)
    return copied


def write_config(config: dict[str, Any], out_dir: str | Path) -> Path:
    """``config.json``."""
    path = Path(out_dir) / "config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def fingerprint(hf_dir: str | Path) -> dict[str, Any]:
    """What identifies an HF directory's weights: config.json's text and the safetensors files' sizes and mtimes."""
    d = Path(hf_dir).resolve()
    files = sorted([*d.glob("*.safetensors"), *d.glob(INDEX), d / "config.json"])
    return {"dir": str(d), "files": [[p.name, p.stat().st_size, int(p.stat().st_mtime_ns)] for p in files
                                     if p.is_file()]}


__all__ = ["GENERATION", "INDEX", "SINGLE", "SafetensorsReader", "TOKENIZER_FILES", "copy_side_files",
           "fingerprint", "write_config", "write_safetensors"]
