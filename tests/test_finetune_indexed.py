"""Megatron indexed datasets for fine-tuning: ``megatron-tasp preprocess`` -> .bin/.idx -> the same documents,
packs and windows as the jsonl they came from; multi-sequence documents; blends; fail-closed checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

from megatron_tasp.apps.finetune_lib import data as D  # noqa: E402
from megatron_tasp.apps.finetune_lib.blend import Blend  # noqa: E402
from megatron_tasp.apps.finetune_lib.indexed import open_indexed  # noqa: E402
from megatron_tasp.apps.finetune_lib.recipe import RecipeError  # noqa: E402
from megatron_tasp.apps.finetune_lib.tokenizer import ByteTokenizer  # noqa: E402
from megatron_tasp.cli import main as cli_main  # noqa: E402

DATA = {"seq_length": 32, "eval_fraction": 0.1}


def _recipe(**data):
    return H.tiny_recipe(DATA, **data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl of documents of mixed length (one empty) and its indexed copy written by megatron-tasp preprocess."""
    root = tmp_path_factory.mktemp("indexed")
    rng = np.random.default_rng(2)
    texts = ["".join(rng.choice(list("abcdefgh \n"), n)) for n in rng.integers(1, 90, 40)] + ["", "last one"]
    jl = root / "docs.jsonl"
    jl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    prefix = root / "out" / "docs"
    assert cli_main(["preprocess", "--input", str(jl), "--output", str(prefix), "data.text_field=body"]) == 0
    return {"jsonl": jl, "prefix": prefix, "root": root}


def test_preprocess_roundtrip_same_documents(corpus, capsys):
    ref = D.tokenize_documents(_recipe(source="jsonl", path=str(corpus["jsonl"]), text_field="body"), ByteTokenizer())
    got = open_indexed(str(corpus["prefix"]))
    assert got.num_docs == ref.num_docs == 41  # the empty text is no document
    assert got.offsets.tolist() == ref.offsets.tolist()
    for i in range(got.num_docs):
        a, b = int(got.offsets[i]), int(got.offsets[i + 1])
        assert np.asarray(got.tokens[a:b]).tolist() == np.asarray(ref.tokens[a:b]).tolist()
        assert int(got.tokens[b - 1:b][0]) == 0  # each document ends with the end-of-document id


@pytest.mark.parametrize("packing", [True, False])
def test_indexed_source_serves_the_same_samples_as_jsonl(corpus, packing):
    tok = ByteTokenizer()
    text = D.open_dataset(_recipe(source="jsonl", path=str(corpus["jsonl"]), text_field="body", packing=packing,
                                  cache_dir=str(corpus["root"] / "cache")), tok)
    idx = D.open_dataset(_recipe(source="indexed", path=str(corpus["prefix"]) + ".bin", packing=packing), tok, 256)
    assert (idx.num_train, idx.num_eval) == (text.num_train, text.num_eval) and idx.num_train > 4
    for k in (0, 3, idx.num_train + 1):
        a, b = idx.train_samples(k, 1), text.train_samples(k, 1)
        if packing:
            for f in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "cu_seqlens_padded"):
                assert np.array_equal(getattr(a[0], f), getattr(b[0], f)), f
        else:
            assert np.array_equal(a, b)
    with pytest.raises(RecipeError, match="outside the model's vocabulary of 100"):
        D.open_dataset(_recipe(source="indexed", path=str(corpus["prefix"])), tok, 100).train_samples(0, 4)


def test_blend_of_prefixes_and_multi_sequence_documents(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    second = corpus["root"] / "split"
    builder = IndexedDatasetBuilder(str(second) + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(4)
    docs = []
    for _ in range(30):  # documents of two or three sequences (sentence-split, as Megatron-LM writes them)
        lengths = [int(n) for n in rng.integers(1, 20, rng.integers(2, 4))]
        ids = rng.integers(1, 256, sum(lengths))
        docs.append(ids)
        builder.add_document(ids, lengths)
    builder.finalize(str(second) + ".idx")
    got = open_indexed(str(second))
    assert got.num_docs == 30
    for i, ids in enumerate(docs):  # a document's tokens read across its sequences
        assert np.asarray(got.tokens[int(got.offsets[i]):int(got.offsets[i + 1])]).tolist() == ids.tolist()
    blend = D.open_dataset(_recipe(source="indexed", path=[str(corpus["prefix"]), str(second)], weights=[1.0, 3.0]),
                           ByteTokenizer(), 256)
    assert isinstance(blend, Blend) and len(blend.parts) == 2
    share = blend.counts[1] / blend.epoch_len
    assert abs(share - 0.75) < 0.05
    assert [blend.locate(k) for k in range(5)] == [blend.locate(k) for k in range(5)]
    assert len(blend.train_samples(0, 3)) == 3 and len(blend.eval_samples(3)) == 3


def test_preprocess_refuses_what_it_cannot_write(corpus, capsys):
    assert cli_main(["preprocess", "--output", str(corpus["root"] / "x"), "data.source=indexed",
                     f"data.path={corpus['prefix']}", "data.max_bytes=null"]) == 2
    assert "data.source is indexed already" in capsys.readouterr().err
    assert cli_main(["preprocess", "--input", str(corpus["jsonl"]), "--output", str(corpus["root"] / "x"),
                     "data.format=sft"]) == 2
    assert "indexed datasets hold no loss mask" in capsys.readouterr().err
    assert not (corpus["root"] / "x.bin").exists()
