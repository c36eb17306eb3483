"""Long-context evaluation of ``megatron-tasp finetune``: held-out loss by position and the passkey check.

- Position buckets: edges, the global position of every zigzag-split token, and the bucket sums at CP=4 and
  at CP=2 x DP=2 (forked gloo ranks, Megatron's parallel_state) equal to a CP=1 computation, exactly.
- Passkey prompts: the pass key at the requested depth, at exact token positions, with the byte tokenizer and
  with a word-level tokenizer (tokens, not bytes).
- Passkey scoring on a toy model whose argmax is known, with the answer straddling two CP ranks.
- A tiny GPT at CP=2 and at CP=1: the same bucket losses and passkey scores; metrics.json fields, the plot.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from megatron_tasp.apps.finetune_lib.eval_report import eval_line, plot_long_context, summarize_long_context
from megatron_tasp.apps.finetune_lib.evaluation import bucket_label, bucket_sums, position_edges
from megatron_tasp.apps.finetune_lib.metrics import summarize
from megatron_tasp.apps.finetune_lib.passkey import (
    FILLER,
    NEEDLE,
    QUESTION,
    build_prompt,
    build_prompts,
    passkey_value,
)
from megatron_tasp.apps.finetune_lib.recipe import RecipeError, load_recipe
from megatron_tasp.apps.finetune_lib.tokenizer import ByteTokenizer
from tests import megatron_helpers as H

PNG = b"\x89PNG\r\n\x1a\n"
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"  # this checkout's shipped recipes
DEFAULT = RECIPES / "default-cpu.yaml"

# ----- position buckets ------------------------------------------------------------------------------------------


def test_position_edges():
    edges = position_edges(131072, 8, "log2")
    assert edges == [0, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    assert [bucket_label(a, b) for a, b in zip(edges, edges[1:])][:3] == ["0-1K", "1K-2K", "2K-4K"]
    assert position_edges(4096, 3, "log2") == [0, 1024, 2048, 4096]
    assert position_edges(8, 8, "log2") == [0, 1, 2, 4, 8]  # buckets under one token merge into the first
    assert position_edges(100, 3, "linear") == [0, 33, 67, 100]
    with pytest.raises(ValueError, match="exceed"):
        position_edges(4, 5, "linear")


def test_bucket_sums_match_a_direct_sum():
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 40, generator=gen)
    pos = torch.randint(0, 64, (3, 40), generator=gen)
    edges = [0, 8, 16, 32, 64]
    sums, counts = bucket_sums(loss, pos, edges)
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        sel = (pos >= lo) & (pos < hi)
        assert counts[i] == int(sel.sum())
        assert sums[i].item() == pytest.approx(loss[sel].double().sum().item(), abs=1e-12)


def test_recipe_checks():
    base = ["data.seq_length=256", "parallel.cp=2"]
    r = load_recipe(DEFAULT, [*base, "passkey.lengths=[128,256]", "passkey.depths=[0,0.5,1]"])
    assert r.passkey.lengths == [128, 256] and r.passkey.trials == 4 and r.train.eval_position_buckets == 8
    assert load_recipe(DEFAULT).passkey.lengths is None  # off in the CPU default (fast)
    for bad, match in [(["passkey.lengths=[130]"], "multiple of 2 \\* parallel.cp = 4"),
                       (["passkey.lengths=[128]", "passkey.depths=[1.5]"], "in \\[0, 1\\]"),
                       (["passkey.lengths=[128,128]"], "must not repeat"),
                       (["passkey.trials=0"], "passkey.trials must be an integer \\(>= 1\\)"),
                       (["passkey.lengths=[512]", "model.position_embedding=learned_absolute"],
                        "learned position table"),
                       (["train.eval_position_spacing=linear", "train.eval_position_buckets=257"], "exceed")]:
        with pytest.raises(RecipeError, match=match):
            load_recipe(DEFAULT, [*base, *bad])
    load_recipe(DEFAULT, [*base, "train.eval_position_spacing=linear", "train.eval_position_buckets=256"])
    load_recipe(DEFAULT, [*base, "passkey.lengths=[512]"])  # beyond seq_length: RoPE extrapolation
    with pytest.raises(RecipeError, match="eval_position_view: document needs data.packing"):
        load_recipe(DEFAULT, [*base, "train.eval_position_view=document", "data.packing=false"])
    for name in ("gpt-403m-h200x2-cp2", "llama3-8b-128k-8xh100", "llama3-8b-128k-2x8xh100"):
        assert load_recipe(RECIPES / f"{name}.yaml").passkey.lengths, f"{name}: GPU recipes run the passkey check"


# ----- passkey prompts -------------------------------------------------------------------------------------------


class WordTokenizer:
    """Phrases, single digits and punctuation as tokens (a stand-in for a subword tokenizer)."""

    name, vocab_size, eod_id = "words", 32, 0

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> np.ndarray:
        pieces = [p.strip() for p in re.findall(r"\d|[^\d.?]+|[.?]", text) if p.strip()]
        return np.array([self.ids.setdefault(p, len(self.ids) + 1) for p in pieces], dtype=np.int64)


def _find(ids: np.ndarray, part: np.ndarray) -> list[int]:
    return [i for i in range(len(ids) - len(part) + 1) if np.array_equal(ids[i:i + len(part)], part)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Any:
    """A Hugging Face tokenizer (byte-level BPE of 300 ids, trained here, offline) through finetune's wrapper."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from megatron_tasp.apps.finetune_lib.tokenizer import HFTokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = [p.read_text(errors="replace") for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tok.train_from_iterator(text, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    return HFTokenizer(str(path))


@pytest.mark.parametrize("kind", ["bytes", "words", "bpe"])
@pytest.mark.parametrize("length", [256, 1000])
def test_passkey_prompt_layout(kind, length, request):
    tok = {"bytes": ByteTokenizer, "words": WordTokenizer}[kind]() if kind != "bpe" else request.getfixturevalue("bpe")
    sentence, question = tok.encode(FILLER), tok.encode(QUESTION)
    for depth in (0.0, 0.3, 0.5, 1.0):
        p = build_prompt(tok, length, depth, "40721")
        needle = tok.encode(NEEDLE.format(key="40721"))
        assert len(p.ids) == length + 1 and p.length == length
        assert _find(p.ids, needle) == [p.needle_start]  # the pass key sentence once, where reported
        assert np.array_equal(p.answer, tok.encode("40721")) and p.answer_start == length + 1 - len(p.answer)
        assert np.array_equal(p.ids[p.answer_start - len(question):p.answer_start], question)
        # whole sentences around the pass key: a partial one first, then `before` of the `whole` sentences
        filler = length + 1 - len(needle) - len(question) - len(p.answer)
        whole, part = divmod(filler, len(sentence))
        before = round(depth * whole)
        assert p.needle_start == part + before * len(sentence)
        assert np.array_equal(p.ids[:part], sentence[len(sentence) - part:])
        after = p.ids[p.needle_start + len(needle):p.answer_start - len(question)]
        assert np.array_equal(after, np.tile(sentence, whole - before))
    if isinstance(tok, ByteTokenizer):
        text = bytes(build_prompt(tok, length, 1.0, "40721").ids.astype(np.uint8)).decode()
        assert text.endswith("again. The pass key is 40721. Remember it. 40721 is the pass key. "
                             "What is the pass key? The pass key is 40721")


def test_passkey_values_and_short_prompts():
    keys = [passkey_value(7, 512, d, t) for d in range(5) for t in range(4)]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) > 15
    assert keys == [passkey_value(7, 512, d, t) for d in range(5) for t in range(4)]  # the same every evaluation
    prompts = build_prompts(ByteTokenizer(), [128, 256], [0.0, 1.0], 3, seed=7)
    assert [(p.length, p.depth, p.trial) for p in prompts[:4]] == [(128, 0.0, 0), (128, 0.0, 1), (128, 0.0, 2),
                                                                   (128, 1.0, 0)]
    with pytest.raises(ValueError, match="cannot hold the passkey prompt"):
        build_prompt(ByteTokenizer(), 64, 0.5, "12345")


# ----- metrics, log line, plot -----------------------------------------------------------------------------------


def _fake_evals() -> list[dict[str, Any]]:
    pk = {"lengths": [128, 256], "depths": [0.0, 1.0], "trials": 2, "accuracy": [[0.0, 0.5], [1.0, 0.5]],
          "token_accuracy": [[0.2, 0.6], [1.0, 0.8]], "answer_nll": [[3.0, 2.0], [0.1, 1.0]], "mean_accuracy": 0.5}
    pos = {"edges": [0, 64, 128, 256], "loss": [3.0, 2.5, 2.2], "tokens": [64, 64, 128]}
    return [{"step": 0, "loss": 5.5, "position_loss": dict(pos, loss=[5.6, 5.5, 5.5]), "passkey": dict(
        pk, mean_accuracy=0.0, accuracy=[[0.0, 0.0], [0.0, 0.0]])}, {"step": 5, "passkey": pk},
        {"step": 10, "loss": 2.4, "position_loss": pos, "passkey": pk}]


def test_summary_values_and_log_line(tmp_path):
    evals = _fake_evals()
    s = summarize([], evals)
    assert (s["first_eval_loss"], s["last_eval_loss"]) == (5.5, 2.4)  # the passkey-only evaluation has no loss
    lc = summarize_long_context(evals)
    assert lc == {"last_position_loss_first_bucket": 3.0, "last_position_loss_last_bucket": 2.2,
                  "position_buckets": "0-64 .. 128-256", "first_passkey_accuracy": 0.0, "last_passkey_accuracy": 0.5}
    line = eval_line(10, evals[-1])
    assert "held-out loss 2.4000" in line and "0-64 3.000, 64-128 2.500, 128-256 2.200" in line
    assert "passkey 50% (2 lengths x 2 depths x 2 trials)" in line
    assert not plot_long_context(tmp_path / "none.png", [{"step": 0, "loss": 1.0}], "t")  # nothing to plot
    assert not (tmp_path / "none.png").exists()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    evals = _fake_evals()
    assert plot_long_context(tmp_path / "lc.png", evals, "t") and (tmp_path / "lc.png").read_bytes()[:8] == PNG
    assert plot_long_context(tmp_path / "p.png", [evals[1]], "t")  # the heatmap alone


# ----- under context parallelism (forked gloo ranks) -------------------------------------------------------------

SEQ, EDGES = 64, [0, 4, 8, 16, 32, 64]
DOCS = [9, 30, 2, 100, 17, 40, 33, 5, 12, 21, 3, 26]  # tokens per document (the 100 one is cut into pieces)


def _toy_loss(batch: dict[str, Any]) -> torch.Tensor:
    """A per-token 'loss' from the local tokens alone (halves: every sum is exact in float64)."""
    return ((batch["labels"] * 3 + batch["tokens"]) % 11).double() / 2 + 0.5


def _windows() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (4, SEQ + 1))


def _packs() -> list:
    """Four packed sequences of SEQ positions (documents padded to multiples of 16)."""
    from megatron_tasp.apps.finetune_lib.packing import Corpus, PackedDataset

    rng = np.random.default_rng(11)
    tokens = np.concatenate([np.append(rng.integers(1, 256, n - 1), 0) for n in DOCS]).astype(np.uint8)
    corpus = Corpus(tokens=tokens, offsets=np.concatenate([[0], np.cumsum(DOCS)]).astype(np.int64))
    data = PackedDataset(corpus, SEQ, 16, 0.0, (1,))
    return [data.item(i) for i in range(4)]


def _samples(kind: str) -> Any:
    return _windows() if kind == "windows" else _packs()


def _oracle_buckets(kind: str, view: str) -> dict[str, Any]:
    """heldout_loss's result written out with numpy: every kept token's loss added into its position's bucket."""
    sums, counts = np.zeros(len(EDGES) - 1), np.zeros(len(EDGES) - 1, dtype=np.int64)
    for s in _samples(kind):
        if kind == "windows":
            tokens, labels, keep, pos = s[:-1], s[1:], np.ones(SEQ), np.arange(SEQ)
        else:
            tokens, labels, keep = s.tokens, s.labels, s.loss_mask
            pos = s.position_ids if view == "document" else np.arange(SEQ)
        loss = ((labels * 3 + tokens) % 11) / 2 + 0.5
        for b in range(len(sums)):
            sel = (pos >= EDGES[b]) & (pos < EDGES[b + 1]) & (keep > 0)
            sums[b] += loss[sel].sum()
            counts[b] += int(sel.sum())
    return {"loss": sums.sum() / counts.sum(), "tokens": int(counts.sum()),
            "position_loss": {"view": view, "edges": EDGES, "loss": list(sums / counts), "tokens": counts.tolist()}}


def _oracle_positions(cp: int, rank: int) -> dict[str, list[int]]:
    """Positions a CP rank holds: windows (zigzag) and a micro-batch of the first two packs (THD split)."""
    from tests.test_megatron_thd_gpt import layout  # TE's THD split, written out independently

    packs = _packs()[:2]
    cu = np.concatenate([[0], packs[0].cu_seqlens_padded[1:], packs[1].cu_seqlens_padded[1:] + SEQ]).tolist()
    index = np.array(layout(cu, cp, rank))
    start = np.array(cu)[np.searchsorted(cu, index, side="right") - 1]
    return {"windows": H.zigzag_positions(rank, cp, SEQ // cp).tolist(), "sequence": (index % SEQ).tolist(),
            "document": (index - start).tolist()}


def _toy_logits(width: int, seven: int, zero: int):
    """Logits 8 * one-hot(label), except a label '7' is predicted as '0'; padding columns >= vocab win if seen."""
    def fn(batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        pred = torch.where(labels == seven, torch.full_like(labels, zero), labels)
        logits = torch.nn.functional.one_hot(pred, width).double() * 8
        logits[..., WordTokenizer.vocab_size:] = 100.0  # vocabulary padding: must be ignored
        return logits
    return fn


def _cp_worker(rank: int, world: int, cp: int, prompts: list, ids: dict[str, int]) -> dict[str, Any]:
    H.import_megatron()
    from megatron.core import parallel_state as ps

    from megatron_tasp.apps.finetune_lib.data import model_inputs
    from megatron_tasp.apps.finetune_lib.evaluation import heldout_loss, token_positions
    from megatron_tasp.apps.finetune_lib.passkey import score_passkeys

    cpu = torch.device("cpu")

    def buckets(kind: str, view: str, group: Any, reduce: Any, dp_rank: int, dp: int) -> dict[str, Any]:
        mine = _samples(kind)[dp_rank::dp]
        batches = (model_inputs(mine[i:i + 2], group, cpu) for i in range(0, len(mine), 2))
        return heldout_loss(_toy_loss, batches, EDGES, group, reduce, cpu, view)

    def passkeys(group: Any, reduce: Any, dp_rank: int, dp: int) -> dict[str, Any]:
        return score_passkeys(_toy_logits(WordTokenizer.vocab_size + 8, ids["7"], ids["0"]), prompts,
                              cp_group=group, reduce_group=reduce, dp_rank=dp_rank, dp=dp, micro_batch=2,
                              device=cpu, vocab_limit=WordTokenizer.vocab_size)

    cases = [("windows", "sequence"), ("packs", "sequence"), ("packs", "document")]
    ps.initialize_model_parallel(context_parallel_size=cp)
    try:
        group, both = ps.get_context_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        packed = model_inputs(_packs()[:2], group, cpu)
        out = {"cp_rank": ps.get_context_parallel_rank(),
               "positions": {"windows": token_positions(model_inputs(_windows()[:1], group, cpu), group, SEQ)[0],
                             "sequence": token_positions(packed, group, SEQ, "sequence")[0],
                             "document": token_positions(packed, group, SEQ, "document")[0]},
               "buckets": {c: buckets(*c, group, both, dp_rank, dp) for c in cases},
               "passkey": passkeys(group, both, dp_rank, dp)}
        out["positions"] = {k: v.tolist() for k, v in out["positions"].items()}
        if rank == 0:  # the CP=1 references, computed here: torch work in the test process would be inherited
            # by later forks (its OpenMP state hangs forked matmuls)
            out["buckets_cp1"] = {c: buckets(*c, None, None, 0, 1) for c in cases}
            out["passkey_cp1"] = passkeys(None, None, 0, 1)
        return out
    finally:
        ps.destroy_model_parallel()


def _expected_passkey(prompts: list) -> dict[str, Any]:
    """Accuracy, token accuracy and answer NLL of the toy model, from the pass keys alone."""
    lse = math.log(math.exp(8) + WordTokenizer.vocab_size - 1)
    table: dict[tuple[int, float], list[tuple[int, int]]] = {}
    for p in prompts:
        table.setdefault((p.length, p.depth), []).append((p.key.count("7"), len(p.key)))
    lengths, depths = sorted({k[0] for k in table}), sorted({k[1] for k in table})
    cells = [[table[(n, d)] for d in depths] for n in lengths]
    return {
        "accuracy": [[sum(w == 0 for w, _ in c) / len(c) for c in row] for row in cells],
        "token_accuracy": [[sum(n - w for w, n in c) / sum(n for _, n in c) for c in row] for row in cells],
        "answer_nll": [[sum(w * lse + (n - w) * (lse - 8) for w, n in c) / sum(n for _, n in c) for c in row]
                       for row in cells],
    }


@pytest.mark.megatron
@pytest.mark.parametrize("cp", [4, 2], ids=["cp4", "cp2xdp2"])
def test_buckets_and_passkey_scores_under_cp_equal_cp1(cp):
    H.require_megatron()
    from megatron_tasp.launch import run_workers

    tok = WordTokenizer()
    tok.encode("0123456789")  # every digit has an id
    # 24 tokens at CP=4: chunks of 3, so the 5 answer tokens (labels 19..23) straddle CP ranks 1 and 0.
    prompts = build_prompts(tok, [24, 40], [0.0, 1.0], 3, seed=3)
    keys = [p.key for p in prompts]
    assert any("7" in k for k in keys) and any("7" not in k for k in keys), keys  # both outcomes occur
    results = run_workers(_cp_worker, 4, cp, prompts, tok.ids, timeout_s=120)

    for r in results:  # windows: chunks r and 2cp-1-r of the sequence; packs: of every document
        assert r["positions"] == _oracle_positions(cp, r["cp_rank"])
    for case in [("windows", "sequence"), ("packs", "sequence"), ("packs", "document")]:
        want = _oracle_buckets(*case)
        assert results[0]["buckets_cp1"][case] == want, case
        for r in results:
            assert r["buckets"][case] == want, (case, r["cp_rank"])  # sums of halves: exact at any layout
    views = [_oracle_buckets("packs", v)["position_loss"]["tokens"] for v in ("sequence", "document")]
    assert views[0] != views[1]  # the packs hold several documents: the two views differ
    kept = _oracle_buckets("packs", "document")["tokens"]
    assert kept == int(sum(s.loss_mask.sum() for s in _packs())) < 4 * SEQ  # padding is out of the loss

    want = _expected_passkey(prompts)
    for got in [results[0]["passkey_cp1"]] + [r["passkey"] for r in results]:
        assert (got["lengths"], got["depths"], got["trials"]) == ([24, 40], [0.0, 1.0], 3)
        assert got["accuracy"] == want["accuracy"] and got["token_accuracy"] == want["token_accuracy"]
        assert np.allclose(got["answer_nll"], want["answer_nll"], rtol=0, atol=1e-6)  # fp32 scoring


# ----- end to end: a tiny GPT ------------------------------------------------------------------------------------

TINY = {
    "name": "tiny-eval",
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 128},
    "data": {"source": "stdlib", "max_bytes": 300000, "seq_length": 256, "eval_fraction": 0.05},
    "parallel": {"cp": 2, "device": "cpu"},
    "train": {"steps": 2, "global_batch": 2, "lr": 3e-3, "eval_batches": 2, "eval_position_buckets": 4,
              "eval_position_view": "document"},  # packed documents (data.packing defaults to true)
    "passkey": {"lengths": [128, 256], "depths": [0.0, 1.0], "trials": 2},
    "checkpoint": {"save": False},
    "logging": {"progress_bar": False, "plot": True},
}


@pytest.mark.megatron
def test_tiny_gpt_packed_cp2_equals_cp1_and_reports(tmp_path):
    H.require_megatron()
    from megatron_tasp.apps.finetune_lib.launch import run_forked
    from megatron_tasp.apps.finetune_lib.trainer import RunOptions
    from megatron_tasp.cli import main as cli_main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, data=dict(TINY["data"], cache_dir=str(tmp_path / "cache")))))
    out = tmp_path / "cp2"
    assert cli_main(["finetune", str(cfg), f"logging.output_dir={out}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in m["eval"]] == [0, 2]
    for e in m["eval"]:
        pos = e["position_loss"]
        assert pos["view"] == "document" and pos["edges"] == [0, 32, 64, 128, 256]
        widths = [32, 32, 64, 128]  # 2 packs: padding is out of the loss
        assert sum(pos["tokens"]) == e["tokens"] and all(0 < n <= 2 * w for n, w in zip(pos["tokens"], widths))
        mean = sum(x * n for x, n in zip(pos["loss"], pos["tokens"], strict=True)) / sum(pos["tokens"])
        assert mean == pytest.approx(e["loss"])
        pk = e["passkey"]
        assert (pk["lengths"], pk["depths"], pk["trials"]) == ([128, 256], [0.0, 1.0], 2)
        assert np.array(pk["accuracy"]).shape == (2, 2) and 0.0 <= pk["mean_accuracy"] <= 1.0
        assert all(0 < x < 10 for row in pk["answer_nll"] for x in row)
    assert m["position_buckets"] == "0-32 .. 128-256" and "last_passkey_accuracy" in m
    if importlib.util.find_spec("matplotlib"):
        assert (out / "long_context.png").read_bytes()[:8] == PNG
    else:  # the plot needs matplotlib; the run does without
        assert not (out / "long_context.png").exists()

    # The same weights at CP=1 (step 0, before any update): the same losses by position and passkey scores.
    one = run_forked(load_recipe(cfg, ["parallel.cp=1", "train.steps=1", f"logging.output_dir={tmp_path / 'cp1'}",
                                       "logging.plot=false"]), RunOptions(log=False), 1)
    a, b = m["eval"][0], one["eval"][0]
    assert a["position_loss"]["tokens"] == b["position_loss"]["tokens"]
    assert np.allclose(a["position_loss"]["loss"], b["position_loss"]["loss"], rtol=0, atol=2e-5)
    assert np.allclose(a["passkey"]["answer_nll"], b["passkey"]["answer_nll"], rtol=0, atol=2e-4)
    assert a["passkey"]["token_accuracy"] == b["passkey"]["token_accuracy"]
