"""TASP inside real Megatron-Core jobs: CP composed with TP, SP, recompute, MoE, DP and PP (CPU, gloo, fp32).

Every case trains a tiny GPTModel (2 layers, hidden 64, 4 heads / 2 query groups, seq 48, vocab 128, RoPE)
for two SGD steps on forked gloo ranks, with TASP core attention under CP, and compares the full per-token
losses of both steps and EVERY parameter gradient of both steps (TP shards reassembled along their
``partition_dim``; pipeline stages' layers renamed to global numbers) with a single-rank TP=1/CP=1 model
that starts from the same weights and uses Megatron's own local attention. Gradients are reduced by hand
as Megatron's DDP would (sum over DP x CP; parameters marked ``sequence_parallel`` also over TP), or by
Megatron's own DistributedDataParallel (all-reduce, or the distributed optimizer's reduce-scatter layout)
and ``finalize_model_grads``; the update is torch's SGD (Megatron's optimizers need CUDA). Pipeline cases
use Megatron's ``get_forward_backward_func``. Each case also checks that TASP ran once per layer and
micro-batch in the forward, and once more inside the backward exactly when recompute is on.
Tolerance: max-abs error relative to max(1e-3, max-abs of the reference) <= 1e-5 for losses and for every
gradient (observed errors are about 1e-6 and below).
"""

from __future__ import annotations

import time

import pytest

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

from tests import compose_helpers as C  # noqa: E402

SEQ = 48  # divisible by 2 * CP * TP for every case below (zigzag halves, then SP shards)
TOL = 1e-5
SELECTIVE = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
FULL = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
MOE = {"num_moe_experts": 4, "moe_router_topk": 2, "add_bias_linear": False}
# megatron-core 0.16's MoE layers call Transformer Engine's GEMM unconditionally (NameError te_general_gemm on CPU)
needs_cpu_moe = pytest.mark.skipif(tuple(int(x) for x in H.megatron_version().split(".")[:2]) < (0, 17),
                                   reason="megatron-core < 0.17 runs MoE only with Transformer Engine")


@pytest.fixture(scope="module", autouse=True)
def _real_attention():
    if not H.real_attention_available():
        pytest.skip("megatron_tasp.attention.tasp_attention is missing")


_REFS: dict[str, dict] = {}


def _reference(opts: dict) -> dict:
    """Single-rank reference for the model shape in ``opts`` (cached per shape)."""
    base = {k: opts[k] for k in ("config", "dp", "micro", "num_layers") if k in opts}
    base["seq"] = SEQ
    base["config"] = {k: v for k, v in base.get("config", {}).items() if not k.startswith("recompute")}
    key = repr(sorted(base.items()))
    if key not in _REFS:
        _REFS[key] = C.reference_run(base)
    return _REFS[key]


def _check_calls(out: list[dict], opts: dict) -> None:
    """TASP ran once per layer, step and micro-batch in the forward, and again inside the backward exactly
    when core attention (selective) or whole layers (full) are recomputed; SP runs have SP-marked norms."""
    per_rank = 2 // opts.get("pp", 1) * 2 * opts.get("microbatches", 1)
    again = per_rank if opts.get("config", {}).get("recompute_granularity") else 0
    for res in out:
        assert res["tasp_calls"] == {"forward": per_rank, "backward": again}, res["tasp_calls"]
        assert (res["sp_params"] > 0) == bool(opts.get("sp")), res["sp_params"]


def _run_case(world: int, **opts) -> list[dict]:
    """Run the combination, compare with the reference (errors asserted <= TOL); return the ranks' results."""
    opts["seq"] = SEQ
    ref = _reference(opts)
    start = time.perf_counter()
    out = C.run(dict(opts, weights=ref["weights"]), world)
    elapsed = time.perf_counter() - start
    assert ref["core_attention"] == ["DotProductAttention"]
    for res in out:
        assert res["core_attention"] == ["TaspDotProductAttention"], res["core_attention"]
    _check_calls(out, opts)
    err = C.compare(out, ref)
    print(f"world={world} {opts.get('tp', 1)}tp x {opts.get('cp', 1)}cp x {opts.get('dp', 1)}dp x "
          f"{opts.get('pp', 1)}pp sp={opts.get('sp', False)}: {elapsed:.1f}s, loss err {err['loss']:.2e}, "
          f"grad err {err['grad']:.2e} ({err['where']})")
    assert err["loss"] <= TOL, err
    assert err["grad"] <= TOL, err
    return out


def test_tp2_cp2():
    _run_case(4, tp=2, cp=2)


def test_tp2_cp2_sequence_parallel():
    _run_case(4, tp=2, cp=2, sp=True)


def test_tp2_cp3_sequence_parallel():
    _run_case(6, tp=2, cp=3, sp=True)


@pytest.mark.parametrize("cp", [2, 4])
def test_selective_recompute_core_attention(cp):
    _run_case(cp, cp=cp, config=dict(SELECTIVE))


def test_selective_recompute_with_tp2_sp_cp2():
    _run_case(4, tp=2, cp=2, sp=True, config=dict(SELECTIVE))


def test_selective_recompute_tp2_sp_cp2_without_kept_kv():
    """keep_kv=False: the backward (run inside the recompute) exchanges KV again instead of keeping it."""
    _run_case(4, tp=2, cp=2, sp=True, config=dict(SELECTIVE), tasp_options={"keep_kv": False})


def test_selective_recompute_cp4_two_rings_two_chunks():
    _run_case(4, cp=4, config=dict(SELECTIVE), tasp_options={"num_rings": 2, "chunks": 2})


def test_tp2_tasp_at_cp1():
    """TASP's CP=1 path (one local kernel) under TP=2 with SP."""
    _run_case(2, tp=2, cp=1, sp=True, tasp_at_cp1=True)


def test_full_recompute_cp2():
    _run_case(2, cp=2, config=dict(FULL))


@needs_cpu_moe
def test_moe_cp2():
    _run_case(2, cp=2, config=dict(MOE))


@needs_cpu_moe
def test_moe_cp4_dp2():
    """No load-balancing loss here: Megatron computes it from each DP replica's own token counts, so it is
    not additive over DP and a one-rank run of both batches is a different objective."""
    _run_case(8, cp=4, dp=2, config=dict(MOE))


@needs_cpu_moe
def test_moe_aux_loss_tp2_sp_cp2():
    """MoE with the load-balancing loss on (coefficient 1e-2) at TP=2 with SP and CP=2."""
    _run_case(4, tp=2, cp=2, sp=True, config=dict(MOE, moe_aux_loss_coeff=1e-2))


def test_full_recompute_tp2_sp_cp2():
    _run_case(4, tp=2, cp=2, sp=True, config=dict(FULL))


def test_cp2_dp2():
    """The two DP replicas take different micro-batches; the reference runs both as one batch."""
    _run_case(4, cp=2, dp=2)


def test_cp2_dp2_megatron_ddp():
    """Megatron's own DistributedDataParallel + finalize_model_grads reduce the gradients (all-reduce)."""
    out = _run_case(4, cp=2, dp=2, ddp="allreduce")
    assert out[0]["shards"] == 1


def test_cp2_dp2_megatron_ddp_distributed_optimizer_layout():
    """DDP with use_distributed_optimizer: buckets reduce-scattered over DP x CP (4 shards), gathered to compare.

    Megatron's DistributedOptimizer itself hard-codes CUDA tensors in 0.19.2; the update here is plain SGD.
    """
    out = _run_case(4, cp=2, dp=2, ddp="distopt")
    assert out[0]["shards"] == 4


def test_tp2_sp_cp2_megatron_ddp_distributed_optimizer_layout():
    """SP norm gradients reduced over TP by Megatron's finalize_model_grads; buckets sharded over CP."""
    out = _run_case(4, tp=2, cp=2, sp=True, ddp="distopt")
    assert out[0]["shards"] == 2


def test_pp2_cp2():
    """Megatron's own pipeline schedule (get_forward_backward_func) with TASP in both stages."""
    _run_case(4, cp=2, pp=2)


def test_pp2_cp2_two_microbatches():
    """1F1B with two micro-batches: the first stage runs the second forward before the first backward."""
    _run_case(4, cp=2, pp=2, microbatches=2)


def test_pp2_tp2_sp_cp2():
    _run_case(8, tp=2, cp=2, pp=2, sp=True)


def test_tp2_sp_cp2_dp2_selective_recompute():
    """Eight ranks: TP x SP x CP x DP with selective recompute of core attention."""
    _run_case(8, tp=2, cp=2, dp=2, sp=True, config=dict(SELECTIVE))


def test_comparison_sees_a_missing_sequence_parallel_reduction():
    """Control: dropping the TP reduction of SP norm gradients must fail the comparison (the check has teeth)."""
    opts = {"seq": SEQ, "tp": 2, "cp": 2, "sp": True}
    ref = _reference(opts)
    out = C.run(dict(opts, weights=ref["weights"], skip_sp_reduce=True), 4)
    assert C.compare(out, ref)["grad"] > 0.1
    first_step, where = H.max_grad_error(C.merge_stage_grads(out)[0], ref["grads"][0])
    assert first_step > 0.1 and "layernorm" in where, (first_step, where)  # the SP norms are what is wrong

