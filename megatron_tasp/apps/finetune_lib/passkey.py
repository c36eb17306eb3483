"""Passkey retrieval: does the model find a 5-digit pass key hidden in long filler text?

A prompt of ``length + 1`` tokens is repeated filler sentences, the pass key sentence ("The pass key is 12345.
Remember it. 12345 is the pass key.") between two sentences at a chosen depth, and at the end the question
"What is the pass key? The pass key is " followed by the pass key's tokens. The model reads the first
``length`` tokens in one forward (teacher forcing, so it runs under context parallelism exactly like
training); a prompt counts as retrieved when the argmax of every answer token is that token. Greedy
generation of the answer gives the same verdict: with every earlier answer token correct, each greedy step
sees exactly the teacher-forced prefix.

The pieces are tokenized separately and joined as token ids (bytes with the byte tokenizer); the filler starts
with the tail of a sentence so that whole sentences surround the pass key and precede the question. The
prompt is one sequence with positions 0 .. length-1 (one document). Pass keys depend only on
``(seed, length, depth, trial)``, so every evaluation of a run scores the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tasp.apps.finetune_lib.data import model_inputs
from megatron_tasp.apps.finetune_lib.evaluation import token_positions

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: ``ids`` has ``length + 1`` tokens (inputs ``ids[:-1]``, labels ``ids[1:]``)."""

    length: int
    depth: float
    trial: int
    key: str
    ids: np.ndarray
    needle_start: int  # index in ids of the pass key sentence's first token
    answer_start: int  # index in ids of the first answer token; the answer runs to the end

    @property
    def answer(self) -> np.ndarray:
        """The answer's token ids (the pass key)."""
        return self.ids[self.answer_start:]


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def build_prompt(tokenizer: Any, length: int, depth: float, key: str, trial: int = 0) -> PasskeyPrompt:
    """The prompt of ``length`` input tokens with pass key ``key`` after ``round(depth * n)`` of its ``n`` whole
    filler sentences."""
    sentence = _encode(tokenizer, FILLER)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    question = _encode(tokenizer, QUESTION)
    answer = _encode(tokenizer, key)
    if not (len(sentence) and len(answer)):
        raise ValueError("the tokenizer turns the passkey filler or answer into no tokens")
    fixed = len(needle) + len(question) + len(answer)
    filler = length + 1 - fixed
    if filler < 0:
        raise ValueError(f"passkey.lengths: {length} tokens cannot hold the passkey prompt (the pass key sentence, "
                         f"question and answer take {fixed - 1} input tokens with this tokenizer); use longer lengths")
    whole, part = divmod(filler, len(sentence))
    before = round(depth * whole)
    ids = np.concatenate([sentence[len(sentence) - part:], np.tile(sentence, before), needle,
                          np.tile(sentence, whole - before), question, answer])
    assert len(ids) == length + 1, (len(ids), length)
    return PasskeyPrompt(length=length, depth=depth, trial=trial, key=key, ids=ids,
                         needle_start=part + before * len(sentence), answer_start=length + 1 - len(answer))


def passkey_value(seed: int, length: int, depth_index: int, trial: int) -> str:
    """The 5-digit pass key of one prompt (a pure function of its arguments)."""
    return str(int(np.random.default_rng([seed, length, depth_index, trial]).integers(10000, 100000)))


def build_prompts(tokenizer: Any, lengths: list[int], depths: list[float], trials: int, seed: int
                  ) -> list[PasskeyPrompt]:
    """Every (length, depth, trial) prompt, lengths outermost."""
    return [build_prompt(tokenizer, n, d, passkey_value(seed, n, i, t), t)
            for n in lengths for i, d in enumerate(depths) for t in range(trials)]


def score_passkeys(logits_fn: Callable[[dict[str, Any]], torch.Tensor], prompts: list[PasskeyPrompt], *,
                   cp_group: Any, reduce_group: Any, dp_rank: int, dp: int, micro_batch: int,
                   device: torch.device, vocab_limit: int) -> dict[str, Any]:
    """Score every prompt in one forward each; return the accuracy table (lengths x depths).

    ``logits_fn(batch)`` returns the logits ``[b, s_local, vocab]`` of a :func:`~.data.model_inputs` batch.
    DP rank ``dp_rank`` scores every ``dp``-th prompt of each length, in micro-batches; each CP rank scores the
    answer tokens it holds (:func:`~.evaluation.token_positions`), and one sum over ``reduce_group`` (DP x CP)
    gathers per prompt the wrong answer tokens, their negative log-likelihood and how many were scored.
    Logits beyond ``vocab_limit`` (vocabulary padding) are ignored.
    """
    stats = torch.zeros(len(prompts), 3, dtype=torch.float64, device=device)  # wrong, nll sum, scored
    lengths = list(dict.fromkeys(p.length for p in prompts))
    for n in lengths:
        mine = [j for j, p in enumerate(prompts) if p.length == n][dp_rank::dp]
        for k in range(0, len(mine), micro_batch):
            group = mine[k:k + micro_batch]
            batch = model_inputs(np.stack([prompts[j].ids for j in group]), cp_group, device)
            logits = logits_fn(batch)
            positions = token_positions(batch, cp_group, n)
            for row, j in enumerate(group):
                # label q predicts ids[q + 1]: the answer tokens are the labels answer_start - 1 .. length - 1
                mask = positions[row] >= prompts[j].answer_start - 1
                scored = logits[row][mask][:, :vocab_limit].float()
                target = batch["labels"][row][mask]
                wrong = (scored.argmax(-1) != target).sum()
                nll = F.cross_entropy(scored, target, reduction="sum") if len(target) else scored.sum()
                stats[j] += torch.stack([wrong.to(torch.float64), nll.to(torch.float64),
                                         torch.tensor(len(target), dtype=torch.float64, device=device)])
    if reduce_group is not None and dist.get_world_size(reduce_group) > 1:
        dist.all_reduce(stats, group=reduce_group)
    stats = stats.cpu().numpy()
    expect = np.array([len(p.answer) for p in prompts])
    if not np.array_equal(stats[:, 2].astype(np.int64), expect):
        raise RuntimeError(f"passkey scoring saw {stats[:, 2].astype(int).tolist()} answer tokens, expected "
                           f"{expect.tolist()}: the CP ranks do not cover each answer exactly once")
    return summarize_passkeys(prompts, stats)


def summarize_passkeys(prompts: list[PasskeyPrompt], stats: np.ndarray) -> dict[str, Any]:
    """Accuracy (all answer tokens right), answer-token accuracy and answer NLL per (length, depth)."""
    lengths = list(dict.fromkeys(p.length for p in prompts))
    depths = list(dict.fromkeys(p.depth for p in prompts))
    shape = (len(lengths), len(depths))
    hits, tok_right, nll, tokens, trials = (np.zeros(shape) for _ in range(5))
    for p, (wrong, loss, scored) in zip(prompts, stats, strict=True):
        cell = lengths.index(p.length), depths.index(p.depth)
        hits[cell] += wrong == 0
        tok_right[cell] += scored - wrong
        nll[cell] += loss
        tokens[cell] += scored
        trials[cell] += 1
    return {"lengths": lengths, "depths": depths, "trials": int(trials.max()),
            "accuracy": (hits / trials).tolist(), "token_accuracy": (tok_right / tokens).tolist(),
            "answer_nll": (nll / tokens).tolist(), "mean_accuracy": float(hits.sum() / trials.sum())}


__all__ = ["FILLER", "NEEDLE", "QUESTION", "PasskeyPrompt", "build_prompt", "build_prompts", "passkey_value",
           "score_passkeys", "summarize_passkeys"]
