"""Tokenizers for fine-tuning: the built-in byte tokenizer and (lazily imported) Hugging Face tokenizers."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no special tokens)."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; the NUL byte (id 0, absent from text) separates documents."""

    name = "byte"
    vocab_size = 256
    eod_id = 0

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text``."""
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).copy()

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw bytes are already ids."""
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids: Any) -> str:
        """Bytes back to text (invalid UTF-8 replaced)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``AutoTokenizer`` (``pip install transformers``); documents end with its EOS id."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ImportError("tokenizer.type: huggingface needs the transformers package (pip install "
                              "transformers); or use tokenizer.type: byte") from exc
        self._tok = AutoTokenizer.from_pretrained(name)
        self.name = f"huggingface:{name}"
        self.vocab_size = int(len(self._tok))
        eod = self._tok.eos_token_id
        self.eod_id = int(eod if eod is not None else 0)

    def encode(self, text: str) -> np.ndarray:
        """Token ids without special tokens."""
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        dtype = np.uint16 if self.vocab_size <= 65535 else np.int32
        return np.asarray(ids, dtype=dtype)

    def decode(self, ids: Any) -> str:
        """Ids back to text."""
        return str(self._tok.decode(list(map(int, ids))))


def build_tokenizer(kind: str, name: str | None = None) -> Tokenizer:
    """``byte`` or ``huggingface`` (with a model name or local directory)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "huggingface":
        if not name:
            raise ValueError("tokenizer.name is required for tokenizer.type: huggingface")
        return HFTokenizer(name)
    raise ValueError(f"tokenizer.type must be byte or huggingface, got {kind!r}")


__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer"]
