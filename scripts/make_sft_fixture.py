"""Write a self-contained SFT fixture for Megatron-LM's ``--sft``: a word-level Hugging Face tokenizer and a
JSON-lines file of synthetic chat conversations with a long-tailed length mix.

Megatron-LM's SFT path (``SFTDataset`` + ``SFTTokenizer``) reads ``{"messages": [...]}`` lines, splits each line
into conversations at every system message and packs them into one sequence, one document per conversation
(``cu_seqlens``), so a line holds several conversations. The tokenizer is a word-level ``tokenizers`` model with
the special tokens of the ``nemotron-h-aligned`` prompt format, so only the assistant turns carry loss.

Megatron-LM's ``SFTLowLevelDataset`` loads the file with Hugging Face ``datasets``; for machines without it the
fixture also writes ``stub/datasets/__init__.py``, a reader for exactly that one call
(``load_dataset("json", data_files=..., split="all")``); ``scripts/megatron_lm_bench.py --sft-data DIR`` puts it
on the path only when ``datasets`` is not importable, and says so.

    python scripts/make_sft_fixture.py --out /tmp/sft --lines 64 --seq 16384
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

WORDS = 2000
SPECIALS = ["<unk>", "<s>", "</s>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_233>"]

STUB = '''"""Stand-in for Hugging Face datasets' ``load_dataset("json", data_files=..., split="all")``, the one call of
Megatron-LM's SFTLowLevelDataset (written by scripts/make_sft_fixture.py for machines without HF datasets)."""

import json


def load_dataset(kind, data_files=None, split="all", **kwargs):
    if kind != "json" or split != "all" or kwargs:
        raise NotImplementedError(f"this stand-in reads JSON lines only: load_dataset({kind!r}, split={split!r})")
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    rows = []
    for name in files:
        with open(name) as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    return rows
'''


def write_tokenizer(out: Path) -> int:
    """A word-level fast tokenizer (whitespace split, ``w0 .. w{WORDS-1}`` plus the role words and the special
    tokens of the nemotron-h-aligned prompt format); returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ["System", "User", "Assistant"]
                                        + [f"w{i}" for i in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<SPECIAL_233>",
                                   additional_special_tokens=["<SPECIAL_10>", "<SPECIAL_11>"])
    fast.save_pretrained(str(out))
    return len(vocab)


def text(rnd: random.Random, n: int) -> str:
    """``n`` words drawn from a Zipf-like distribution (a few words common, most rare)."""
    return " ".join(f"w{min(int(rnd.paretovariate(1.1)) - 1, WORDS - 1)}" for _ in range(n))


def conversation(rnd: random.Random, mean: int) -> list[dict]:
    """System, then one to three user/assistant turns; lengths log-normal around ``mean`` words in all."""
    total = max(8, int(rnd.lognormvariate(math.log(mean), 1.0)))
    turns = rnd.randint(1, 3)
    msgs = [{"role": "system", "content": text(rnd, rnd.randint(4, 16))}]
    for _ in range(turns):
        msgs.append({"role": "user", "content": text(rnd, max(1, total // (3 * turns)))})
        msgs.append({"role": "assistant", "content": text(rnd, max(1, 2 * total // (3 * turns)))})
    return msgs


def write_data(path: Path, lines: int, seq: int, mean: int, seed: int) -> dict:
    """``lines`` JSON lines, each holding conversations of about 1.2 x ``seq`` words (Megatron-LM truncates the
    pack at ``seq`` tokens); returns length statistics."""
    rnd = random.Random(seed)
    docs = []
    with open(path, "w") as fh:
        for _ in range(lines):
            msgs, words = [], 0
            while words < 1.2 * seq:
                conv = conversation(rnd, mean)
                n = sum(len(m["content"].split()) for m in conv)
                msgs.extend(conv)
                words += n
                docs.append(n)
            fh.write(json.dumps({"messages": msgs}) + "\n")
    docs.sort()
    # what was written: Megatron-LM truncates each line's pack at ``seq`` tokens, so ~1/6 never trains
    return {"conversations_written": len(docs), "median_words_written": docs[len(docs) // 2], "max_words": docs[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write (tokenizer/, train.jsonl, stub/)")
    ap.add_argument("--lines", type=int, default=64, help="JSON lines (packed sequences) to write")
    ap.add_argument("--seq", type=int, default=16384, help="sequence length the lines should fill")
    ap.add_argument("--mean", type=int, default=1500,
                    help="median of the log-normal conversation length, in words")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    (out / "stub" / "datasets").mkdir(parents=True, exist_ok=True)
    (out / "stub" / "datasets" / "__init__.py").write_text(STUB)
    vocab = write_tokenizer(out / "tokenizer")
    stats = write_data(out / "train.jsonl", a.lines, a.seq, a.mean, a.seed)
    meta = {"vocab": vocab, "lines": a.lines, "seq": a.seq, "lognormal_median_words": a.mean, "seed": a.seed,
            **stats}
    (out / "fixture.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
