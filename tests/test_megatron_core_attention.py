"""TaspDotProductAttention: Megatron's core-attention contract, options, fail-closed errors (CP = 1)."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from tests.megatron_helpers import require_megatron, tiny_config

require_megatron()
pytestmark = pytest.mark.megatron

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_tasp import options as O  # noqa: E402
from megatron_tasp.megatron.core_attention import TaspDotProductAttention  # noqa: E402
from megatron_tasp.options import TaspOptions  # noqa: E402


@dataclass
class PG:
    cp: object = None


def _plain(q, k, v, causal, scale):
    rep = q.shape[2] // k.shape[2]
    qf, kf, vf = (x.float().permute(1, 2, 0, 3) for x in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    s = qf @ kf.transpose(-1, -2) * scale
    if causal:
        n = q.shape[0]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ vf).permute(2, 0, 1, 3)


def _make(**kw):
    args = dict(config=tiny_config(1), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                cp_comm_type=None, softmax_scale=None, pg_collection=PG())
    args.update(kw)
    return TaspDotProductAttention(**args)


def _qkv(s=12, b=2, h=4, g=2, d=16, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, h, d, generator=gen), torch.randn(s, b, g, d, generator=gen),
            torch.randn(s, b, g, dv or d, generator=gen))


@pytest.mark.parametrize("mask", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_cp1_matches_plain_attention_gqa(mask):
    attn = _make(attn_mask_type=mask)
    q, k, v = _qkv()
    out = attn(q, k, v, None, attn_mask_type=mask, attention_bias=None, packed_seq_params=None)
    assert out.shape == (12, 2, 4 * 16)
    ref = _plain(q, k, v, mask == AttnMaskType.causal, 1 / math.sqrt(16)).reshape(12, 2, -1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_attention_mask_tensor_is_ignored_for_causal_like_te():
    attn = _make()
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).triu(1)
    torch.testing.assert_close(attn(q, k, v, mask), attn(q, k, v, None))


def test_softmax_scale_rules():
    cfg = tiny_config(1, kv_channels=16)
    assert _make(config=cfg).softmax_scale == pytest.approx(0.25)
    assert _make(softmax_scale=0.5).softmax_scale == 0.5
    cfg2 = tiny_config(1, softmax_scale=0.3)
    assert _make(config=cfg2).softmax_scale == pytest.approx(0.3)
    # layer scaling is a numerical trick in Megatron (divide, then multiply back in the softmax): no change
    cfg3 = tiny_config(1, apply_query_key_layer_scaling=True, fp16=True, params_dtype=torch.float16)
    assert _make(config=cfg3, layer_number=3).softmax_scale == pytest.approx(0.25)


def test_mla_head_dims_q_wider_than_v():
    attn = _make(k_channels=24, v_channels=16)
    assert attn.softmax_scale == pytest.approx(1 / math.sqrt(24))
    q, k, v = _qkv(h=4, g=4, d=24, dv=16)
    out = attn(q, k, v, None)
    assert out.shape == (12, 2, 4 * 16)
    ref = _plain(q, k, v, True, 1 / math.sqrt(24)).reshape(12, 2, -1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_value_wider_than_query():
    attn = _make(k_channels=8, v_channels=16)
    q, k, v = _qkv(h=4, g=2, d=8, dv=16)
    out = attn(q, k, v, None)
    ref = _plain(q, k, v, True, 1 / math.sqrt(8)).reshape(12, 2, -1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_backward_matches_plain():
    attn = _make()
    q, k, v = (x.requires_grad_() for x in _qkv())
    attn(q, k, v, None).square().sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    _plain(q, k, v, True, 0.25).square().sum().backward()
    for a, x in zip(got, (q, k, v)):
        torch.testing.assert_close(a, x.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask", [AttnMaskType.padding, AttnMaskType.arbitrary, AttnMaskType.padding_causal])
def test_unsupported_masks_fail_at_build(mask):
    with pytest.raises(NotImplementedError, match="mask"):
        _make(attn_mask_type=mask)


def test_unsupported_mask_in_forward():
    attn = _make()
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="padding"):
        attn(q, k, v, None, attn_mask_type=AttnMaskType.padding)


def test_bias_packed_and_unknown_kwargs_fail_closed():
    attn = _make()
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="attention_bias"):
        attn(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="packed"):
        attn(q, k, v, None, packed_seq_params=types.SimpleNamespace(qkv_format="thd"))
    with pytest.raises(TypeError, match="frobnicate"):
        attn(q, k, v, None, frobnicate=1)
    with pytest.raises(TypeError, match="frobnicate"):
        _make(frobnicate=True)
    _make(num_splits=None, pp_layer_offset=0)  # tolerated


def test_dropout_window_softmax_type_fail_closed():
    with pytest.raises(ValueError, match="attention_dropout"):
        _make(config=tiny_config(1, attention_dropout=0.1))
    with pytest.raises(ValueError, match="dropout"):
        _make(attention_dropout=0.2)
    _make(config=tiny_config(1, attention_dropout=0.1), attention_dropout=0.0)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        _make(config=tiny_config(1, window_size=(8, 0)))


def test_te_delegation_without_te_names_the_fix():
    from megatron.core.extensions import transformer_engine as te_ext

    if getattr(te_ext, "HAVE_TE", False):
        pytest.skip("Transformer Engine installed")
    for comm in ("p2p", "a2a", "allgather"):
        with pytest.raises(ImportError, match="transformer-engine"):
            _make(cp_comm_type=comm, layer_number=2)
    assert isinstance(_make(cp_comm_type="tasp"), TaspDotProductAttention)
    assert isinstance(_make(cp_comm_type="TASP"), TaspDotProductAttention)


def test_te_delegation_builds_te_module(monkeypatch):
    from megatron.core.extensions import transformer_engine as te_ext

    class FakeTE(torch.nn.Module):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, k_channels=None, v_channels=None, num_splits=None, cp_comm_type="p2p",
                     pg_collection=None):
            super().__init__()
            self.cp_comm_type = cp_comm_type

    monkeypatch.setattr(te_ext, "HAVE_TE", True, raising=False)
    monkeypatch.setattr(te_ext, "TEDotProductAttention", FakeTE)
    m = _make(cp_comm_type="allgather", options=TaspOptions(num_rings=3))
    assert isinstance(m, FakeTE) and m.cp_comm_type == "all_gather"


def _recording(monkeypatch):
    calls = []

    def fake(q, k, v, cp_group, **kw):
        calls.append((cp_group, kw))
        return torch.zeros_like(q)

    monkeypatch.setitem(sys.modules, "megatron_tasp.attention", types.SimpleNamespace(tasp_attention=fake))
    return calls


def test_options_reach_tasp_attention(monkeypatch, tmp_path):
    calls = _recording(monkeypatch)
    topo = tmp_path / "t.yaml"
    topo.write_text("name: t\ngpus_per_node: 1\n")
    first = TaspOptions(num_rings=2, transport="auto", kernel="math", keep_kv=False, topology=str(topo))
    second = TaspOptions(num_rings="auto", transport="p2p", keep_kv="auto", chunks=2)
    q, k, v = _qkv()
    _make(options=first)(q, k, v, None)
    _make(options=second, attn_mask_type=AttnMaskType.no_mask)(q, k, v, None)
    (g0, kw0), (g1, kw1) = calls
    assert g0 is None and set(kw0) == {"causal", "softmax_scale", "options"}
    assert kw0["causal"] is True and kw0["softmax_scale"] == pytest.approx(0.25)
    o0, o1 = kw0["options"], kw1["options"]
    assert o0.num_rings == 2 and o0.transport is None and o0.kernel == "math" and o0.keep_kv is False
    assert o0.topology.world_size == 1  # loaded once, at construction
    assert o0.replace(topology=str(topo)) == first
    assert o1 == second and kw1["causal"] is False
    assert o1.num_rings == "auto" and o1.transport == "p2p" and o1.keep_kv == "auto" and o1.chunks == 2


def test_no_options_means_default_options_with_environment(monkeypatch):
    calls = _recording(monkeypatch)
    monkeypatch.setenv("MEGATRON_TASP_NUM_RINGS", "1")
    monkeypatch.setenv("MEGATRON_TASP_KEEP_KV", "0")
    O.reload_env()
    try:
        attn = _make()
    finally:
        monkeypatch.delenv("MEGATRON_TASP_NUM_RINGS")
        monkeypatch.delenv("MEGATRON_TASP_KEEP_KV")
        O.reload_env()
    assert attn.options == TaspOptions(num_rings=1, keep_kv=False)
    q, k, v = _qkv()
    attn(q, k, v, None)
    assert calls[0][1]["options"] == TaspOptions(num_rings=1, keep_kv=False)
    assert "num_rings=1" in repr(attn)


def test_old_ways_of_passing_options_fail_closed():
    cfg = tiny_config(1)
    cfg.tasp_num_rings = 2
    with pytest.raises(TypeError, match=r"config.tasp_num_rings .*tasp_layer_spec\(spec, options="):
        _make(config=cfg)
    with pytest.raises(TypeError, match=r"tasp_transport.*tasp_layer_spec\(spec, options="):
        _make(tasp_transport="p2p")
    with pytest.raises(TypeError, match="tasp_keep_kv"):
        _make(tasp_keep_kv=None)
    with pytest.raises(TypeError, match="must be a TaspOptions"):
        _make(options={"num_rings": 2})


def test_topology_checked_against_cp_size_at_build(tmp_path):
    """A topology for another GPU count fails when the module is built (here CP 1 inside a 2-rank world)."""
    from megatron_tasp.launch import run_workers

    topo = tmp_path / "four.yaml"
    topo.write_text("name: four\ngpus_per_node: 4\n")

    def worker(rank, world):
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(context_parallel_size=2)
        try:
            group = parallel_state.get_context_parallel_group()
            try:
                _make(config=tiny_config(2), pg_collection=PG(cp=group), options=TaspOptions(topology=str(topo)))
            except Exception as exc:  # noqa: BLE001
                return str(exc)
            return "built"
        finally:
            parallel_state.destroy_model_parallel()

    for msg in run_workers(worker, 2):
        assert "describes 4 GPUs" in msg, msg


def test_te_extra_state_is_dropped_on_load():
    attn = _make()
    missing, unexpected = attn.load_state_dict({"_extra_state": torch.zeros(1)}, strict=True)
    assert not missing and not unexpected


def test_deepcopy_and_repr():
    import copy

    attn = _make()
    assert isinstance(copy.deepcopy(attn), TaspDotProductAttention)
    assert "cp=1" in repr(attn)


def test_cp1_inside_a_larger_world_stays_local():
    """DP 2 x CP 1: each rank attends over its own tokens only (with or without a CP group)."""
    from megatron_tasp.launch import run_workers

    def worker(rank, world):
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(context_parallel_size=1)
        try:
            q, k, v = _qkv(seed=rank)
            ref = _plain(q, k, v, True, 0.25).reshape(12, 2, -1)
            with_group = _make(pg_collection=PG(cp=parallel_state.get_context_parallel_group()))
            without = _make(pg_collection=None)
            without.cp_group = None  # as when no CP group can be found
            return [float((m(q, k, v, None) - ref).abs().max()) for m in (with_group, without)]
        finally:
            parallel_state.destroy_model_parallel()

    for errs in run_workers(worker, 2):
        assert max(errs) < 1e-5, errs
