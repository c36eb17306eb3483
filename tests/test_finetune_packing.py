"""Packed documents for fine-tuning (numpy only): packing, sample layout, loss masks, SFT, order, blends,
and the recipe rules of the data options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_tasp.apps.finetune_lib import data as D
from megatron_tasp.apps.finetune_lib.blend import Blend, blend_counts
from megatron_tasp.apps.finetune_lib.packing import Corpus, PackedDataset, pack_documents
from megatron_tasp.apps.finetune_lib.recipe import RecipeError, recipe_from_dict
from megatron_tasp.apps.finetune_lib.tokenizer import ByteTokenizer
from tests import megatron_helpers as H

DATA = {"seq_length": 64}


def _recipe(**data):
    return H.tiny_recipe(DATA, **data)


def _corpus(lengths, seed=0, mask=False):
    """Documents of ``lengths`` tokens with distinct random ids (1..250), EOD 0 at each end."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, 251, n - 1), 0) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    m = np.concatenate([(np.arange(n) >= n // 2).astype(np.uint8) for n in lengths]) if mask else None
    return Corpus(tokens=np.concatenate(docs).astype(np.uint8), offsets=offsets, mask=m), docs


LENGTHS = [9, 30, 2, 150, 17, 64, 65, 1, 40, 33, 5, 12, 70, 3, 21]


def test_pack_documents_first_fit_splits_and_pads():
    positions = np.array(LENGTHS) - 1  # n tokens -> n - 1 positions
    packs = pack_documents(positions, capacity=64, multiple=8)
    seen: dict[int, list[tuple[int, int]]] = {}
    for p in range(len(packs)):
        lo, hi = packs.ptr[p], packs.ptr[p + 1]
        padded = [-(-int(n) // 8) * 8 for n in packs.length[lo:hi]]
        assert 0 < sum(padded) <= 64 and all(n > 0 for n in packs.length[lo:hi])
        for d, s, n in zip(packs.doc[lo:hi], packs.start[lo:hi], packs.length[lo:hi]):
            seen.setdefault(int(d), []).append((int(s), int(n)))
            if n == 64:
                assert hi - lo == 1  # a full piece is a pack of its own
    for d, n in enumerate(positions):  # every position of every document exactly once, pieces in order
        pieces = sorted(seen.get(d, []))
        assert sum(k for _, k in pieces) == n and [s for s, _ in pieces] == list(range(0, n, 64))[:len(pieces)]
    assert seen[3] == [(0, 64), (64, 64), (128, 21)]  # 150 tokens: two full pieces and the rest
    assert 7 not in seen  # a one-token document has no position to train
    # first fit: the 2-token document (1 position, 8 padded) lands in the first pack, next to document 0
    assert packs.doc[packs.ptr[0]:packs.ptr[1]].tolist()[:3] == [0, 1, 2]
    with pytest.raises(ValueError, match="not a multiple"):
        pack_documents(positions, capacity=60, multiple=8)


def test_packed_sample_layout_masks_and_positions():
    corpus, docs = _corpus(LENGTHS)
    ds = PackedDataset(corpus, seq_length=64, pad_multiple=8, eval_fraction=0.0, seed_key=(1,))
    covered = {d: 0 for d in range(len(docs))}
    for p in range(len(ds.packs)):
        s = ds.item(p)
        cu, pad = s.cu_seqlens.tolist(), s.cu_seqlens_padded.tolist()
        assert pad[0] == 0 and pad[-1] == 64 and all((b - a) % 8 == 0 and b > a for a, b in zip(pad, pad[1:]))
        assert len(cu) == len(pad) and cu[0] == 0
        lo = ds.packs.ptr[p]
        for i in range(len(pad) - 1):
            a, n = pad[i], cu[i + 1] - cu[i]
            assert 0 <= n <= pad[i + 1] - a
            assert s.position_ids[a:pad[i + 1]].tolist() == list(range(pad[i + 1] - a))  # restart per document
            assert s.loss_mask[a:a + n].all() and not s.loss_mask[a + n:pad[i + 1]].any()  # padding: no loss
            if n == 0:  # the padding-only document that fills the pack
                assert i == len(pad) - 2
                continue
            d, start = int(ds.packs.doc[lo + i]), int(ds.packs.start[lo + i])
            doc = docs[d]
            assert s.tokens[a:a + n].tolist() == doc[start:start + n].tolist()
            assert s.labels[a:a + n].tolist() == doc[start + 1:start + n + 1].tolist()  # never the next document
            covered[d] += n
    assert all(covered[d] == max(n - 1, 0) for d, n in enumerate(LENGTHS))


def test_order_is_a_pure_function_of_seed_and_sample():
    corpus, _ = _corpus(LENGTHS * 4, seed=3)
    a = PackedDataset(corpus, 64, 8, 0.2, (7,))
    b = PackedDataset(corpus, 64, 8, 0.2, (7,))
    assert set(a.train_items).isdisjoint(a.eval_items) and a.num_eval > 0
    ks = [5, 0, 3 * a.num_train + 2, 1, a.num_train]
    for k in ks:  # any visiting order, any instance: the same sample
        sa, sb = a.train_item(k), b.train_item(k)
        assert np.array_equal(sa.tokens, sb.tokens) and np.array_equal(sa.cu_seqlens_padded, sb.cu_seqlens_padded)
    epoch0 = [a.train_index(i) for i in range(a.num_train)]
    assert sorted(epoch0) == sorted(a.train_items.tolist())
    assert epoch0 != [a.train_index(a.num_train + i) for i in range(a.num_train)]
    other = PackedDataset(corpus, 64, 8, 0.2, (8,))
    assert epoch0 != [other.train_index(i) for i in range(other.num_train)]
    assert len(a.train_samples(3, 4)) == 4 and len(a.eval_samples(100)) == a.num_eval


def test_sft_loss_mask_covers_response_tokens_only(tmp_path):
    jl = tmp_path / "sft.jsonl"
    pairs = [("Q: 2+2?\nA:", " 4"), ("Say hi.", " hi there"), ("x" * 70, "y" * 20)]
    jl.write_text("".join(json.dumps({"q": p, "a": r}) + "\n" for p, r in pairs))
    r = _recipe(source="jsonl", path=str(jl), format="sft", prompt_field="q", response_field="a",
                eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    corpus = D.load_corpus(r, ByteTokenizer())
    assert corpus.mask is not None and corpus.num_docs == 3
    ds = PackedDataset(corpus, 64, 16, 0.0, (0,))
    trained = []
    for p in range(len(ds.packs)):
        s = ds.item(p)
        trained.append(bytes(s.labels[s.loss_mask > 0].tolist()))
        assert (s.loss_mask[s.labels == ord("x")] == 0).all()  # no prompt token is a trained label
    assert b"".join(trained) == b" 4\x00 hi there\x00" + b"y" * 20 + b"\x00"
    with pytest.raises(RecipeError, match="has no field 'a'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"q": "x"}) + "\n")
        D.tokenize_documents(_recipe(source="jsonl", path=str(bad), format="sft", prompt_field="q",
                                     response_field="a"), ByteTokenizer())


def test_text_corpus_offsets_and_cache(tmp_path):
    for name, text in (("a.txt", "hello"), ("b.txt", ""), ("c.txt", "world!")):
        (tmp_path / name).write_text(text)
    r = _recipe(source="files", path=str(tmp_path / "*.txt"), cache_dir=str(tmp_path / "cache"))
    corpus = D.load_corpus(r, ByteTokenizer())
    assert corpus.offsets.tolist() == [0, 6, 13] and corpus.mask is None  # the empty file is no document
    assert bytes(np.asarray(corpus.tokens).tolist()) == b"hello\x00world!\x00"
    assert bytes(D.tokenize_corpus(r, ByteTokenizer()).tolist()) == b"hello\x00world!\x00"


def test_blend_shares_and_order():
    parts = [PackedDataset(_corpus(LENGTHS * k, seed=k)[0], 64, 8, 0.1, (1, k)) for k in (2, 5)]
    blend = Blend(parts, [3.0, 1.0], seed=1)
    n = blend.epoch_len
    assert blend.counts.tolist() == blend_counts([3, 1], parts[0].num_train + parts[1].num_train).tolist()
    picks = [blend.locate(k) for k in range(2 * n)]
    for c in (0, 1):  # each part's samples are consecutive in its own order, at the blend's share
        mine = [j for part, j in picks if part == c]
        assert mine == list(range(2 * int(blend.counts[c])))
    assert abs(blend.counts[0] / n - 0.75) < 0.02
    again = Blend(parts, [3.0, 1.0], seed=1)
    assert [again.locate(k) for k in (n + 3, 4, 0)] == [picks[n + 3], picks[4], picks[0]]
    assert len(blend.train_samples(0, 3)) == 3 and len(blend.eval_samples(4)) == 4
    assert blend_counts([1e-9, 1.0], 10).tolist() == [1, 10]  # every part at least once


def test_pad_multiple_default_and_data_rules(tmp_path):
    assert [_recipe().pad_multiple, _recipe(seq_length=72).pad_multiple] == [16, 4]
    assert recipe_from_dict({**H.TINY_RECIPE, "parallel": {"cp": 3}, "data": {"seq_length": 72}}).pad_multiple == 18
    assert recipe_from_dict({**H.TINY_RECIPE, "parallel": {"cp": 8}, "data": {"seq_length": 64}}).pad_multiple == 16
    assert _recipe(pad_multiple=32).pad_multiple == 32
    for data, needle in [
        ({"pad_multiple": 6}, "data.pad_multiple=6 must be a multiple of 2 \\* parallel.cp = 4"),
        ({"pad_multiple": 24}, "divide data.seq_length=64"),
        ({"format": "sft", "source": "files", "path": "x"}, "data.format: sft reads prompt/response pairs"),
        ({"format": "sft", "source": "jsonl", "path": "x", "packing": False}, "sft needs data.packing: true"),
        ({"source": "jsonl", "path": "x", "weights": [1.0]}, "data.weights blends indexed datasets"),
        ({"source": "indexed", "path": ["a", "b"], "weights": [1.0]}, "one weight per prefix"),
        ({"source": "indexed", "path": ["a", "b"], "weights": [1.0, 0.0]}, "must all be > 0"),
        ({"source": "indexed", "path": "a", "max_bytes": 10}, "remove data.max_bytes"),
        ({"source": "indexed"}, "data.path is required for data.source: indexed"),
    ]:
        with pytest.raises(RecipeError, match=needle):
            _recipe(**data)
    with pytest.raises(RecipeError, match="no Megatron indexed dataset at"):
        D.open_dataset(_recipe(source="indexed", path=str(tmp_path / "missing")), ByteTokenizer())
