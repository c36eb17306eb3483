"""Memory hygiene of TASP's kept KV inside a Megatron GPT step (CPU, gloo, CP=2, keep_kv=True).

With ``keep_kv`` the forward keeps the KV pieces it received for the backward. Under selective recompute of
core attention, Megatron runs TASP's forward without autograd first (nothing may be kept then), and again
inside the backward (its exchanges included); the pieces that re-run keeps must be gone once the backward
is over. Kept buffers are tracked with weak references taken in the engine's forward.
"""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

import pytest
import torch

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

from tests import compose_helpers as C  # noqa: E402

SEQ = 48
SELECTIVE = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}


def kept_kv_worker(rank: int, world: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Count TASP's kept-KV buffers still alive at each point of a GPT step at CP = world with keep_kv=True.

    Wraps ``megatron_tasp.attention.forward`` (the engine's forward, which returns the kept buffers last)
    to hold a weak reference to every kept buffer, and ``tasp_attention`` to count calls; then runs two
    forward+backward steps. Returns, per step, how many calls ran with / without autograd (and inside the
    backward) and how many kept buffers are alive after the forward and after the backward (``gc.collect()``
    first).
    """
    H.import_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import megatron_tasp.attention as engine

    refs: list[weakref.ref] = []
    calls = {"grad": 0, "no_grad": 0, "in_backward": 0}
    phase = {"backward": False}
    real, real_entry = engine.forward, engine.tasp_attention

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        refs.extend(weakref.ref(t) for t in (result[-1] or []) if t is not None)
        return result

    def entry(*args: Any, **kwargs: Any) -> Any:  # autograd turns grad mode off inside forward: look here
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        calls["in_backward"] += int(phase["backward"])
        return real_entry(*args, **kwargs)

    engine.forward, engine.tasp_attention = recording, entry
    ps.initialize_model_parallel(context_parallel_size=world)
    try:
        model_parallel_cuda_manual_seed(1234)
        config = H.tiny_config(world, **opts.get("config", {}))
        spec = C.block_spec(config, tasp=True, num_layers=2, options={"keep_kv": True})
        model = GPTModel(config=config, transformer_layer_spec=spec,
                         vocab_size=C.VOCAB, max_sequence_length=opts["seq"], position_embedding_type="rope")
        cp_group = ps.get_context_parallel_group()
        steps = []
        for batch in C.make_batches({"seq": opts["seq"], "steps": 2}):
            local = H.cp_slice(batch, cp_group)
            refs.clear()
            for key in calls:
                calls[key] = 0
            loss = model(input_ids=local["tokens"], position_ids=local["position_ids"], attention_mask=None,
                         labels=local["labels"]).sum()
            gc.collect()
            after_forward = sum(r() is not None for r in refs)
            phase["backward"] = True
            loss.backward()
            phase["backward"] = False
            del loss
            gc.collect()
            # gloo's worker threads may still hold a finished exchange's buffers for a moment (seen once in a
            # full CI run on 2 busy cores): wait a bounded time for them before counting
            deadline = time.monotonic() + 5.0
            while any(r() is not None for r in refs) and time.monotonic() < deadline:
                time.sleep(0.05)
                gc.collect()
            steps.append({**calls, "kept": len(refs), "alive_after_forward": after_forward,
                          "alive_after_backward": sum(r() is not None for r in refs)})
            model.zero_grad(set_to_none=True)
        return {"steps": steps}
    finally:
        engine.forward, engine.tasp_attention = real, real_entry
        ps.destroy_model_parallel()

@pytest.mark.parametrize("recompute", [False, True])
def test_kept_kv_buffers_freed_after_backward(recompute):
    """keep_kv=True at CP=2: kept KV pieces live from forward to backward only, also when selective recompute
    of core attention re-runs TASP's forward (and its exchanges) inside the backward."""
    from megatron_tasp.launch import run_workers

    opts = {"seq": SEQ, "config": dict(SELECTIVE) if recompute else {}}
    for res in run_workers(kept_kv_worker, 2, opts):
        for step in res["steps"]:
            if recompute:  # no-grad forward, then the re-run inside backward keeps (and must drop) the pieces
                assert step["no_grad"] == 2 and step["grad"] == 2 and step["in_backward"] == 2, step
                assert step["alive_after_forward"] == 0, step
            else:  # the probe sees kept pieces while the graph holds them
                assert step["grad"] == 2 and step["in_backward"] == 0, step
                assert step["alive_after_forward"] == step["kept"] > 0, step
            assert step["kept"] > 0 and step["alive_after_backward"] == 0, step
