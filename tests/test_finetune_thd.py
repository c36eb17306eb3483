"""Packed documents through the fine-tuning path (dataset -> model_inputs -> Megatron GPTModel with TASP):

- at CP=1 every packed document's per-token loss equals that document run alone (no attention across
  documents, positions restart; RoPE and learned absolute positions);
- a micro-batch of two packs at CP=2 (THD split, Megatron's PackedSeqParams) equals CP=1: per-token loss and
  every gradient;
- a short SFT fine-tune with packing at CP=2 follows the CP=1 run's losses.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

from megatron_tasp.apps.finetune_lib.packing import Corpus, PackedDataset  # noqa: E402
from megatron_tasp.apps.finetune_lib.recipe import load_recipe, recipe_from_dict  # noqa: E402
from megatron_tasp.launch import run_workers  # noqa: E402
from tests.test_megatron_thd_gpt import layout  # noqa: E402  (TE's THD split, the oracle's own copy)

SEQ, PAD = 64, 16
LENGTHS = [9, 30, 2, 100, 17, 40, 33, 5, 12, 21, 3, 26]  # tokens per document (the 100 one is split)


def corpus() -> tuple[Corpus, list[np.ndarray]]:
    rng = np.random.default_rng(11)
    docs = [np.append(rng.integers(1, 256, n - 1), 0) for n in LENGTHS]
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    return Corpus(tokens=np.concatenate(docs).astype(np.uint8), offsets=offsets), docs


def recipe(cp: int, position: str = "rope") -> Any:
    return recipe_from_dict({
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
                  "ffn_hidden_size": 64, "position_embedding": position},
        "data": {"seq_length": SEQ}, "parallel": {"cp": cp, "device": "cpu"}, "train": {"steps": 1}})




def packed_worker(rank: int, world: int, opts: dict[str, Any]) -> dict[str, Any]:
    H.import_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_tasp.apps.finetune_lib.data import model_inputs
    from megatron_tasp.apps.finetune_lib.model import build_model, transformer_config

    ps.initialize_model_parallel(context_parallel_size=world)
    try:
        cpu = torch.device("cpu")
        out: dict[str, Any] = {}
        for position in opts["positions"]:
            r = recipe(world, position)
            model_parallel_cuda_manual_seed(1234)
            torch.manual_seed(1234)
            _, model = build_model(r, transformer_config(r, cpu), 256, cpu)
            ds = PackedDataset(corpus()[0], SEQ, PAD, 0.0, (0,))
            samples = [ds.item(i) for i in opts["packs"]]
            group = ps.get_context_parallel_group()
            batch = model_inputs(samples, group, cpu)
            loss = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                         labels=batch["labels"], packed_seq_params=batch["packed_seq_params"])
            mask = batch["loss_mask"]
            total = sum(float(s.loss_mask.sum()) for s in samples)
            ((loss * mask).sum() / total).backward()
            grads = {}
            for name, p in model.named_parameters():
                g = p.grad.detach().clone()
                if world > 1:
                    dist.all_reduce(g, group=group)
                grads[name] = g
            cu_pad = batch["packed_seq_params"].cu_seqlens_q_padded.tolist()
            parts = [torch.empty_like(loss) for _ in range(world)]
            dist.all_gather(parts, loss.detach().contiguous(), group=group)
            full = torch.empty(cu_pad[-1])
            for k, part in enumerate(parts):
                full[layout(cu_pad, world, k)] = part[0]
            alone = []
            if world == 1:  # each document of the first pack run on its own, without packed_seq_params
                s = samples[0]
                for i in range(len(s.cu_seqlens) - 1):
                    a, n = int(s.cu_seqlens_padded[i]), int(s.cu_seqlens[i + 1] - s.cu_seqlens[i])
                    if n == 0:
                        continue
                    one = model(input_ids=torch.from_numpy(s.tokens[a:a + n])[None],
                                position_ids=torch.arange(n)[None], attention_mask=None,
                                labels=torch.from_numpy(s.labels[a:a + n])[None])
                    alone.append(float((one[0] - full[a:a + n]).abs().max()))
            out[position] = {"loss": full, "mask": torch.from_numpy(np.concatenate([s.loss_mask for s in samples])),
                             "grads": grads if rank == 0 else None, "alone": alone}
        import megatron.core.transformer.attention as mattention

        out["rope_router"] = mattention.apply_rotary_pos_emb.__module__  # build_model routes packed RoPE
        return out
    finally:
        ps.destroy_model_parallel()


def _packs() -> list[int]:
    """Two packs that hold several documents each (and so padding between them)."""
    ds = PackedDataset(corpus()[0], SEQ, PAD, 0.0, (0,))
    multi = [p for p in range(len(ds.packs)) if ds.packs.ptr[p + 1] - ds.packs.ptr[p] >= 3]
    assert len(multi) >= 2
    return multi[:2]


_CP1: dict[str, Any] = {}


def _cp1() -> dict[str, Any]:
    if not _CP1:
        _CP1.update(run_workers(packed_worker, 1, {"positions": ["rope", "learned_absolute"], "packs": _packs()},
                                timeout_s=300)[0])
    return _CP1


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_packed_documents_do_not_see_each_other(position):
    alone = _cp1()[position]["alone"]
    assert len(alone) >= 3 and max(alone) < 1e-5, alone


def test_packed_micro_batch_at_cp2_equals_cp1():
    ref = _cp1()["rope"]
    out = run_workers(packed_worker, 2, {"positions": ["rope"], "packs": _packs()}, timeout_s=300)[0]
    assert out["rope_router"] == "megatron_tasp.megatron.thd_rope"  # data.packing: TASP's packed RoPE
    got = out["rope"]
    real = ref["mask"] > 0
    assert 0 < int(real.sum()) < 2 * SEQ  # padding inside the micro-batch
    err = float((got["loss"][real] - ref["loss"][real]).abs().max()) / float(ref["loss"][real].abs().max())
    assert err < 1e-5, err
    grad_err, where = H.max_grad_error(got["grads"], ref["grads"])
    assert grad_err < 1e-5, (grad_err, where)


def test_sft_finetune_cp2_follows_cp1(tmp_path):
    """A short SFT run on packed prompt/response pairs: CP=2 and CP=1 see the same tokens and losses."""
    pytest.importorskip("psutil", reason="megatron.core.dist_checkpointing (imported by the trainer) needs psutil")
    from megatron_tasp.apps.finetune_lib.launch import run_forked
    from megatron_tasp.apps.finetune_lib.trainer import RunOptions

    rng = np.random.default_rng(5)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    with open(tmp_path / "sft.jsonl", "w") as fh:
        for _ in range(120):
            fh.write(json.dumps({"prompt": " ".join(rng.choice(words, rng.integers(1, 6))) + "?",
                                 "response": " ".join(rng.choice(words, rng.integers(1, 9)))}) + "\n")
    common = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.ffn_hidden_size=64", "data.source=jsonl",
              f"data.path={tmp_path / 'sft.jsonl'}", "data.format=sft", "data.max_bytes=null", "data.seq_length=128",
              f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.global_batch=2", "train.micro_batch=2",
              "train.warmup_steps=0", "train.eval_batches=2", "train.eval_interval=0", "checkpoint.save=false",
              "logging.plot=false"]
    runs = {}
    for cp in (1, 2):
        recipe = load_recipe(None, [*common, f"parallel.cp={cp}", f"logging.output_dir={tmp_path / f'cp{cp}'}"])
        runs[cp] = run_forked(recipe, RunOptions(log=False), cp)
    l1, l2 = ([s["loss"] for s in runs[cp]["steps"]] for cp in (1, 2))
    assert len(l1) == 2 and abs(l1[0] - l2[0]) < 1e-5 and abs(l1[1] - l2[1]) < 1e-4, (l1, l2)
    assert 4.5 < l1[0] < 6.5  # ~ln(256) at initialisation, over response tokens only
    e1, e2 = ([e["loss"] for e in runs[cp]["eval"]] for cp in (1, 2))
    assert len(e1) == 2 and all(abs(a - b) < 1e-4 for a, b in zip(e1, e2)), (e1, e2)
