"""Training data: a text corpus tokenized once into a flat token file, cut into fixed-length sequences.

Sources (``data.source``): ``stdlib`` (this Python's standard-library ``.py`` files, sorted, tests and
site-packages skipped), ``files`` (a path/glob or list of them; text files), ``jsonl`` (one JSON object per
line, ``data.text_field`` holds the text). Documents are joined with the tokenizer's end-of-document id.

The token stream is cut into non-overlapping windows of ``seq_length + 1`` tokens (inputs and shifted
labels); every ``1/eval_fraction``-th window is held out for evaluation. Training visits the remaining
windows in a seeded random order, epoch after epoch: sample ``k`` is a pure function of ``(seed, k)``, so
the number of consumed samples is the whole data position (checkpoints store it and resume exactly,
whatever the data-parallel size).

The tokenized stream is cached as ``<cache_dir>/<hash>.npy`` (written once, atomically, by global rank 0;
other ranks read it memory-mapped, or build it themselves if the cache is not on a shared filesystem).
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

from megatron_tasp.apps.finetune_lib.recipe import Recipe, RecipeError
from megatron_tasp.apps.finetune_lib.tokenizer import ByteTokenizer, Tokenizer

CACHE_VERSION = 1
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


def iter_documents(recipe: Recipe) -> Iterator[str | bytes]:
    """Documents of the corpus (bytes for stdlib/files, str for jsonl), stopping after data.max_bytes."""
    d = recipe.data
    budget = d.max_bytes if d.max_bytes is not None else float("inf")
    for path in source_files(recipe):
        if budget <= 0:
            return
        if d.source == "jsonl":
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise RecipeError(f"data.path: {path}:{lineno} is not valid JSON ({exc.msg})") from None
                    if not isinstance(obj, dict) or d.text_field not in obj:
                        raise RecipeError(f"data.text_field: {path}:{lineno} has no field '{d.text_field}'")
                    text = str(obj[d.text_field])
                    budget -= len(text.encode("utf-8"))
                    yield text
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
    """Hash of everything the token stream depends on (paths, sizes, mtimes, limits, tokenizer)."""
    d = recipe.data
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, d.source, d.text_field, d.max_bytes, tokenizer.name,
                         tokenizer.vocab_size, tokenizer.eod_id]).encode())
    for p in source_files(recipe):
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def tokenize_corpus(recipe: Recipe, tokenizer: Tokenizer) -> np.ndarray:
    """The whole corpus as one token array, documents separated by the end-of-document id."""
    parts: list[np.ndarray] = []
    eod = np.array([tokenizer.eod_id], dtype=np.int64)
    byte_level = isinstance(tokenizer, ByteTokenizer)
    for doc in iter_documents(recipe):
        if isinstance(doc, bytes):
            ids = tokenizer.encode_bytes(doc) if byte_level else tokenizer.encode(doc.decode("utf-8", "replace"))
        else:
            ids = tokenizer.encode(doc)
        if ids.size:
            parts.append(ids.astype(np.int64, copy=False))
            parts.append(eod)
    if not parts:
        raise RecipeError("data: the corpus is empty (check data.path / data.max_bytes)")
    dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    return np.concatenate(parts).astype(dtype)


def cache_path(recipe: Recipe, tokenizer: Tokenizer) -> Path:
    """Where the tokenized corpus of this recipe is cached."""
    root = Path(os.path.expanduser(recipe.data.cache_dir)) if recipe.data.cache_dir else \
        recipe.output_dir() / "data_cache"
    return root / f"tokens-{_corpus_key(recipe, tokenizer)}.npy"


def build_token_cache(recipe: Recipe, tokenizer: Tokenizer) -> Path:
    """Tokenize the corpus into the cache file unless it is there already (atomic write); return its path."""
    path = cache_path(recipe, tokenizer)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = tokenize_corpus(recipe, tokenizer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, tokens)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_tokens(recipe: Recipe, tokenizer: Tokenizer) -> np.ndarray:
    """The cached token stream (memory-mapped), building the cache if needed."""
    return np.load(build_token_cache(recipe, tokenizer), mmap_mode="r")


@dataclass
class SequenceDataset:
    """Fixed-length windows over a token stream, split into train and held-out windows."""

    tokens: np.ndarray
    seq_length: int
    eval_fraction: float
    seed: int

    def __post_init__(self) -> None:
        n = (len(self.tokens) - 1) // self.seq_length
        if n < 2:
            raise RecipeError(f"data: the corpus has {len(self.tokens)} tokens, fewer than two sequences of "
                              f"data.seq_length + 1 = {self.seq_length + 1}; add text or shorten data.seq_length")
        windows = np.arange(n)
        if self.eval_fraction > 0:
            stride = max(2, round(1.0 / self.eval_fraction))
            held = windows % stride == stride - 1
            if not held.any():
                held[-1] = True
            self.eval_windows = windows[held]
            self.train_windows = windows[~held]
        else:
            self.eval_windows = windows[:0]
            self.train_windows = windows
        self._perm_epoch = -1
        self._perm: np.ndarray = self.train_windows

    @property
    def num_train(self) -> int:
        """Training windows per epoch."""
        return int(len(self.train_windows))

    def window(self, index: int) -> np.ndarray:
        """Tokens of window ``index`` (``seq_length + 1`` of them)."""
        start = int(index) * self.seq_length
        return np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64)

    def train_window_index(self, sample: int) -> int:
        """Window of the ``sample``-th training sample (seeded shuffle per epoch)."""
        epoch, pos = divmod(int(sample), self.num_train)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = self.train_windows[rng.permutation(self.num_train)]
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def train_samples(self, first: int, count: int) -> np.ndarray:
        """``[count, seq_length + 1]`` token windows of training samples ``first .. first + count - 1``."""
        return np.stack([self.window(self.train_window_index(first + i)) for i in range(count)])

    def eval_samples(self, count: int) -> np.ndarray:
        """``[count, seq_length + 1]`` held-out windows, evenly spread over the held-out set."""
        if count <= 0 or not len(self.eval_windows):
            return np.zeros((0, self.seq_length + 1), dtype=np.int64)
        pick = np.linspace(0, len(self.eval_windows) - 1, num=min(count, len(self.eval_windows))).round()
        return np.stack([self.window(self.eval_windows[int(i)]) for i in pick])


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


def model_inputs(windows: Any, cp_group: Any, device: Any) -> dict[str, Any]:
    """Tokens, labels and positions of ``[b, seq + 1]`` windows, zigzag-split over CP, on ``device``."""
    import torch

    w = torch.as_tensor(np.ascontiguousarray(windows), dtype=torch.long)
    b, s = w.shape[0], w.shape[1] - 1
    batch = {"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(),
             "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()}
    batch = cp_split(batch, cp_group)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


__all__ = ["SequenceDataset", "build_token_cache", "cache_path", "cp_split", "iter_documents", "load_tokens",
           "model_inputs", "source_files", "stdlib_files", "tokenize_corpus"]
