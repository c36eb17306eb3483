"""Training data: a corpus of documents tokenized once into a cached token file, served as packed documents
(:mod:`.packing`, the default) or as fixed-length windows over the concatenated stream (``data.packing: false``).

Sources (``data.source``): ``stdlib`` (this Python's standard-library ``.py`` files, sorted, tests and
site-packages skipped), ``files`` (a path/glob or list of them; text files), ``jsonl`` (one JSON object per
line: ``data.text_field`` holds the text, or with ``data.format: sft`` a prompt and a response) and
``indexed`` (Megatron ``.bin``/``.idx`` datasets, :mod:`.indexed`). Every file, JSON object or indexed
document is one document; each ends with the tokenizer's end-of-document id.

Windows: the token stream is cut into non-overlapping windows of ``seq_length + 1`` tokens (inputs and shifted
labels). Packs and windows alike: every ``1/eval_fraction``-th one is held out for evaluation, and training
visits the others in a seeded random order, epoch after epoch (:mod:`.blend`): sample ``k`` is a pure function
of ``(seed, k)``, so the number of consumed samples is the whole data position.

The tokenized corpus is cached as ``<cache_dir>/tokens-<hash>.npy`` with its document offsets
(``docs-<hash>.npy``) and, for SFT, its loss mask (``mask-<hash>.npy``), written once, atomically, by local rank
0 (the tokens file last); other ranks read them memory-mapped.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_tasp.apps.finetune_lib.blend import Blend, ItemDataset
from megatron_tasp.apps.finetune_lib.packing import Corpus, PackedDataset, packed_model_inputs
from megatron_tasp.apps.finetune_lib.recipe import Recipe, RecipeError
from megatron_tasp.apps.finetune_lib.tokenizer import ByteTokenizer, Tokenizer

CACHE_VERSION = 2  # 2: document offsets and the SFT loss mask next to the tokens
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib", "turtledemo"}


def stdlib_files() -> list[Path]:
    """Sorted ``.py`` files of this interpreter's standard library (tests and site-packages skipped)."""
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return [Path(p) for p in sorted(paths)]


def _expand_paths(spec: str | list[str]) -> list[Path]:
    items = spec if isinstance(spec, list) else [spec]
    out: list[Path] = []
    for item in items:
        pattern = os.path.expanduser(os.path.expandvars(item))
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise RecipeError(f"data.path: '{item}' matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
            else:
                out.append(p)
    return out


def source_files(recipe: Recipe) -> list[Path]:
    """The files a recipe's corpus is read from, in order."""
    d = recipe.data
    if d.source == "stdlib":
        files = stdlib_files()
        if not files:
            raise RecipeError("data.source: stdlib found no .py files in this Python's standard library; "
                              "use data.source: files")
        return files
    return _expand_paths(d.path)  # type: ignore[arg-type]


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"data.path: {path}:{lineno} is not valid JSON ({exc.msg})") from None
            yield lineno, obj


def _field(obj: Any, name: str, option: str, path: Path, lineno: int) -> str:
    if not isinstance(obj, dict) or name not in obj:
        raise RecipeError(f"data.{option}: {path}:{lineno} has no field '{name}'")
    return str(obj[name])


def iter_documents(recipe: Recipe) -> Iterator[str | bytes | tuple[str, str]]:
    """Documents of the corpus, stopping after data.max_bytes: bytes for stdlib/files, str for jsonl text,
    ``(prompt, response)`` for jsonl with ``data.format: sft``."""
    d = recipe.data
    if d.source == "indexed":
        raise RecipeError(f"{recipe.source}: data.source: indexed is read by megatron.core's IndexedDataset, not as "
                          "text")
    budget = d.max_bytes if d.max_bytes is not None else float("inf")
    for path in source_files(recipe):
        if budget <= 0:
            return
        if d.source == "jsonl":
            for lineno, obj in _jsonl_records(path):
                doc: str | tuple[str, str]
                if d.format == "sft":
                    doc = (_field(obj, d.prompt_field, "prompt_field", path, lineno),
                           _field(obj, d.response_field, "response_field", path, lineno))
                    budget -= sum(len(x.encode("utf-8")) for x in doc)
                else:
                    doc = _field(obj, d.text_field, "text_field", path, lineno)
                    budget -= len(doc.encode("utf-8"))
                yield doc
                if budget <= 0:
                    return
        else:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if budget < len(data):
                data = data[:int(budget)]
            budget -= len(data)
            yield data


def _corpus_key(recipe: Recipe, tokenizer: Tokenizer) -> str:
    """Hash of everything the tokens depend on (paths, sizes, mtimes, limits, format, tokenizer)."""
    d = recipe.data
    h = hashlib.sha256()
    fields = [d.text_field] if d.format == "text" else [d.prompt_field, d.response_field]
    h.update(json.dumps([CACHE_VERSION, d.source, d.format, *fields, d.max_bytes, tokenizer.name,
                         tokenizer.vocab_size, tokenizer.eod_id]).encode())
    for p in source_files(recipe):
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _ids(tokenizer: Tokenizer, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
        if isinstance(tokenizer, ByteTokenizer):
            return tokenizer.encode_bytes(text)
        text = text.decode("utf-8", "replace")
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def iter_token_documents(recipe: Recipe, tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Every document as int64 token ids ending with the end-of-document id, with its SFT loss mask (0 on
    prompt tokens, 1 on the response and its end-of-document id; None for text). Empty text is skipped."""
    eod = np.array([tokenizer.eod_id], dtype=np.int64)
    for doc in iter_documents(recipe):
        if isinstance(doc, tuple):
            prompt, response = _ids(tokenizer, doc[0]), _ids(tokenizer, doc[1])
            yield (np.concatenate([prompt.astype(np.int64), response.astype(np.int64), eod]),
                   np.concatenate([np.zeros(prompt.size, np.uint8), np.ones(response.size + 1, np.uint8)]))
            continue
        ids = _ids(tokenizer, doc)
        if ids.size:
            yield np.concatenate([ids.astype(np.int64, copy=False), eod]), None


def tokenize_documents(recipe: Recipe, tokenizer: Tokenizer) -> Corpus:
    """The corpus as documents back to back (:func:`iter_token_documents`), their offsets and the SFT mask."""
    parts: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for ids, mask in iter_token_documents(recipe, tokenizer):
        parts.append(ids)
        if mask is not None:
            masks.append(mask)
    if not parts:
        raise RecipeError("data: the corpus is empty (check data.path / data.max_bytes)")
    dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    return Corpus(tokens=np.concatenate(parts).astype(dtype), offsets=offsets,
                  mask=np.concatenate(masks) if masks else None)


def tokenize_corpus(recipe: Recipe, tokenizer: Tokenizer) -> np.ndarray:
    """The whole corpus as one token array, documents separated by the end-of-document id."""
    return tokenize_documents(recipe, tokenizer).tokens


def cache_path(recipe: Recipe, tokenizer: Tokenizer) -> Path:
    """Where the tokenized corpus of this recipe is cached (its tokens file; written last)."""
    root = Path(os.path.expanduser(recipe.data.cache_dir)) if recipe.data.cache_dir else \
        recipe.output_dir() / "data_cache"
    return root / f"tokens-{_corpus_key(recipe, tokenizer)}.npy"


def _companion(path: Path, kind: str) -> Path:
    return path.with_name(path.name.replace("tokens-", f"{kind}-", 1))


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def build_token_cache(recipe: Recipe, tokenizer: Tokenizer) -> Path:
    """Tokenize the corpus into the cache unless it is there already (atomic writes, the tokens file last);
    return the tokens file's path."""
    path = cache_path(recipe, tokenizer)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    corpus = tokenize_documents(recipe, tokenizer)
    _save(_companion(path, "docs"), corpus.offsets)
    if corpus.mask is not None:
        _save(_companion(path, "mask"), corpus.mask)
    _save(path, corpus.tokens)
    return path


def load_tokens(recipe: Recipe, tokenizer: Tokenizer) -> np.ndarray:
    """The cached token stream (memory-mapped), building the cache if needed."""
    return np.load(build_token_cache(recipe, tokenizer), mmap_mode="r")


def load_corpus(recipe: Recipe, tokenizer: Tokenizer) -> Corpus:
    """The cached corpus (memory-mapped tokens, document offsets, SFT mask), building the cache if needed."""
    path = build_token_cache(recipe, tokenizer)
    mask = _companion(path, "mask")
    return Corpus(tokens=np.load(path, mmap_mode="r"), offsets=np.load(_companion(path, "docs")),
                  mask=np.load(mask, mmap_mode="r") if recipe.data.format == "sft" else None)


@dataclass
class SequenceDataset(ItemDataset):
    """Fixed-length windows over a token stream, split into train and held-out windows."""

    tokens: Any
    seq_length: int
    eval_fraction: float
    seed: int | tuple[int, ...]

    def __post_init__(self) -> None:
        n = (len(self.tokens) - 1) // self.seq_length
        if n < 2:
            raise RecipeError(f"data: the corpus has {len(self.tokens)} tokens, fewer than two sequences of "
                              f"data.seq_length + 1 = {self.seq_length + 1}; add text or shorten data.seq_length")
        self._setup_order(n, self.eval_fraction, self.seed if isinstance(self.seed, tuple) else (self.seed,))

    @property
    def train_windows(self) -> np.ndarray:
        """Indices of the training windows."""
        return self.train_items

    @property
    def eval_windows(self) -> np.ndarray:
        """Indices of the held-out windows."""
        return self.eval_items

    def summary(self) -> str:
        """One line for the start-up banner."""
        return f"{len(self.tokens):,} tokens, {self.num_train} train / {self.num_eval} held-out windows"

    def window(self, index: int) -> np.ndarray:
        """Tokens of window ``index`` (``seq_length + 1`` of them)."""
        start = int(index) * self.seq_length
        return np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64)

    item = window

    def train_window_index(self, sample: int) -> int:
        """Window of the ``sample``-th training sample (seeded shuffle per epoch)."""
        return self.train_index(sample)

    def collate(self, samples: list[Any]) -> np.ndarray:
        """``[count, seq_length + 1]`` windows."""
        if not samples:
            return np.zeros((0, self.seq_length + 1), dtype=np.int64)
        return np.stack(samples)


def open_dataset(recipe: Recipe, tokenizer: Tokenizer, vocab_size: int | None = None) -> Any:
    """The recipe's dataset: packed documents or windows, over the cached corpus or Megatron indexed datasets
    (several prefixes blended by ``data.weights``). ``vocab_size`` (indexed data): token ids must stay below it."""
    d = recipe.data
    if d.source == "indexed":
        from megatron_tasp.apps.finetune_lib.indexed import open_indexed, prefixes

        corpora = [open_indexed(p) for p in prefixes(recipe)]
    else:
        corpora = [load_corpus(recipe, tokenizer)]
        vocab_size = None  # tokenized here with the recipe's tokenizer
    parts: list[ItemDataset] = []
    for i, corpus in enumerate(corpora):
        key = (recipe.seed,) if len(corpora) == 1 else (recipe.seed, i)
        if d.packing:
            parts.append(PackedDataset(corpus, d.seq_length, recipe.pad_multiple, d.eval_fraction, key, vocab_size))
        else:
            parts.append(SequenceDataset(corpus.tokens, d.seq_length, d.eval_fraction, key))
    return parts[0] if len(parts) == 1 else Blend(parts, d.weights, recipe.seed)


def describe_dataset(dataset: Any) -> str:
    """One line about a dataset of :func:`open_dataset`."""
    if isinstance(dataset, Blend):
        shares = ", ".join(f"{int(c)}" for c in dataset.counts)
        return (f"blend of {len(dataset.parts)} datasets ({shares} samples per blended epoch); "
                + "; ".join(p.summary() for p in dataset.parts))
    return str(dataset.summary())


def cp_split(batch: dict[str, Any], cp_group: Any) -> dict[str, Any]:
    """Megatron's zigzag CP split (rank r keeps chunks r and 2cp-1-r of 2cp); its signature changed in 0.17."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if cp_group is None or cp_group.size() == 1:
        return batch
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)
    params = inspect.signature(get_batch_on_this_cp_rank).parameters
    if "cp_group" in params:
        return get_batch_on_this_cp_rank(batch, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch)


def model_inputs(samples: Any, cp_group: Any, device: Any) -> dict[str, Any]:
    """Model inputs of a micro-batch on ``device``, split over CP. Windows (``[b, seq + 1]`` tokens): tokens,
    labels and positions, zigzag-split. Packed samples (a list): THD inputs with ``loss_mask`` and
    ``packed_seq_params`` (:func:`~megatron_tasp.apps.finetune_lib.packing.packed_model_inputs`)."""
    if isinstance(samples, list):
        return packed_model_inputs(samples, cp_group, device)
    import torch

    w = torch.as_tensor(np.ascontiguousarray(samples), dtype=torch.long)
    b, s = w.shape[0], w.shape[1] - 1
    batch = {"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(),
             "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()}
    batch = cp_split(batch, cp_group)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


__all__ = ["SequenceDataset", "build_token_cache", "cache_path", "cp_split", "describe_dataset", "iter_documents",
           "iter_token_documents", "load_corpus", "load_tokens", "model_inputs", "open_dataset", "source_files",
           "stdlib_files", "tokenize_corpus", "tokenize_documents"]
