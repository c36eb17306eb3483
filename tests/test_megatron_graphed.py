"""``cuda_graphs`` inside a Megatron GPT step (CPU, gloo, CP=2) with the stand-in capturer of test_graphed: every
layer shares one call signature, so after the first layer's eager call the graphs are captured once and every
later layer and step replays them, with and without selective recompute of core attention (whose first
forward runs without autograd and is re-run inside the backward). Losses and every gradient must equal the
eager run's exactly, over three steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

import megatron_tasp.engine.graphed as graphed_mod  # noqa: E402
from tests import compose_helpers as C  # noqa: E402
from tests.test_graphed import COUNTS, Rerun  # noqa: E402

SEQ = 48
SELECTIVE = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}


def _worker(rank: int, world: int, opts: dict[str, Any]) -> dict[str, Any]:
    H.import_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_tasp import clear_plan_cache

    clear_plan_cache()
    ps.initialize_model_parallel(context_parallel_size=world)
    try:
        model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
        config = H.tiny_config(world, num_layers=3, **opts["config"])
        spec = C.block_spec(config, tasp=True, num_layers=3,
                            options={"cuda_graphs": opts["graphs"], "keep_kv": opts["keep_kv"]})
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=C.VOCAB,
                         max_sequence_length=SEQ, position_embedding_type="rope")
        cp_group = ps.get_context_parallel_group()
        steps = []
        for batch in C.make_batches({"seq": SEQ, "steps": 3}):
            local = H.cp_slice(batch, cp_group)
            loss = model(input_ids=local["tokens"], position_ids=local["position_ids"], attention_mask=None,
                         labels=local["labels"])
            loss.sum().backward()
            steps.append({"loss": loss.detach().clone(),
                          "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                    if p.grad is not None}})
            model.zero_grad(set_to_none=True)
        return {"steps": steps, "counts": dict(COUNTS)}
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("recompute,keep_kv", [(False, True), (True, True), (False, False)])
def test_gpt_steps_with_graphs_equal_eager_steps(monkeypatch, recompute, keep_kv):
    from megatron_tasp.launch import run_workers

    COUNTS.update(captures=0, replays=0, warm=0)
    monkeypatch.setattr(graphed_mod, "_new_capturer", lambda device: Rerun())
    config = dict(SELECTIVE) if recompute else {}
    eager = run_workers(_worker, 2, {"graphs": False, "keep_kv": keep_kv, "config": config}, timeout_s=300)
    graph = run_workers(_worker, 2, {"graphs": True, "keep_kv": keep_kv, "config": config}, timeout_s=300)
    for e, g in zip(eager, graph):
        assert e["counts"]["captures"] == 0
        # one signature for every layer: captured once (forward and backward), then replayed
        assert g["counts"]["captures"] == 2 and g["counts"]["replays"] > 0, g["counts"]
        for se, sg in zip(e["steps"], g["steps"]):
            assert torch.equal(se["loss"], sg["loss"])
            assert se["grads"].keys() == sg["grads"].keys()
            for name, ge in se["grads"].items():
                assert torch.equal(ge, sg["grads"][name]), name
