"""tasp_layer_spec and the ready spec functions: swapping TASP core attention into Megatron specs."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.megatron_helpers import require_megatron, tiny_config

require_megatron()
pytestmark = pytest.mark.megatron

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402

from megatron_tasp import options as O  # noqa: E402
from megatron_tasp.megatron import spec as S  # noqa: E402
from megatron_tasp.megatron.core_attention import TaspDotProductAttention  # noqa: E402
from megatron_tasp.options import TaspOptionError, TaspOptions  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tasp_environment(no_tasp_env):
    """These tests assume no MEGATRON_TASP_* option in the environment (the env tests set their own)."""


def _core(spec):
    return spec.submodules.self_attention.submodules.core_attention


def test_layer_spec_swapped_and_original_untouched():
    base = get_gpt_layer_local_spec()
    before = _core(base)
    new = S.tasp_layer_spec(base)
    assert _core(new) is TaspDotProductAttention
    assert _core(base) is before and before is not TaspDotProductAttention
    assert new.submodules.self_attention is not base.submodules.self_attention  # structure copied
    assert new.submodules.self_attention.module is base.submodules.self_attention.module  # classes shared
    assert S.count_tasp_layers(new) == 1 and S.count_tasp_layers(base) == 0
    assert _core(S.tasp_layer_spec(new)) is TaspDotProductAttention  # idempotent


def test_te_like_spec_is_swapped():
    class TEDotProductAttention(torch.nn.Module):
        pass

    base = get_gpt_layer_local_spec()
    base.submodules.self_attention.submodules.core_attention = TEDotProductAttention
    assert _core(S.tasp_layer_spec(base)) is TaspDotProductAttention


def test_mla_spec_is_swapped():
    new = S.tasp_layer_spec(get_gpt_layer_local_spec(multi_latent_attention=True))
    assert type(new.submodules.self_attention.submodules).__name__ == "MLASelfAttentionSubmodules"
    assert _core(new) is TaspDotProductAttention


def test_block_spec_every_layer():
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    block = TransformerBlockSubmodules(layer_specs=[get_gpt_layer_local_spec() for _ in range(3)])
    new = S.tasp_layer_spec(block)
    assert [(_core(ls) is TaspDotProductAttention) for ls in new.layer_specs] == [True] * 3
    assert all(_core(ls) is not TaspDotProductAttention for ls in block.layer_specs)


def test_decoder_block_spec_function():
    cfg = tiny_config(1, num_layers=3)
    new = S.gpt_tasp_decoder_block_spec(cfg, pp_rank=0)
    assert len(new.layer_specs) == 3 and S.count_tasp_layers(new) == 3


def test_hybrid_stack_spec():
    try:
        from megatron_tasp.megatron.hybrid_spec import tasp_hybrid_stack_spec
    except ImportError as exc:  # 0.16's mamba stack spec needs mamba_ssm/triton
        pytest.skip(f"hybrid stack spec not importable here: {exc}")
    sub = tasp_hybrid_stack_spec.submodules
    assert _core(sub.attention_layer) is TaspDotProductAttention
    from megatron_tasp.megatron.hybrid_spec import hybrid_tasp_stack_spec

    opts = TaspOptions(num_rings=1)
    assert _core(hybrid_tasp_stack_spec(options=opts).submodules.attention_layer).params == {"options": opts}
    if hasattr(sub, "dsa_layer"):  # DSA's composite sparse core attention is kept
        assert _core(sub.dsa_layer) is not TaspDotProductAttention


def test_composite_and_cross_attention_are_kept():
    base = get_gpt_layer_local_spec()
    composite = ModuleSpec(module=torch.nn.Identity, submodules=object())
    base.submodules.self_attention.submodules.core_attention = composite
    with pytest.raises(S.SpecError, match="no self-attention core_attention"):
        S.tasp_layer_spec(base)
    assert S.tasp_layer_spec(base, strict=False).submodules.self_attention.submodules.core_attention is not None

    cross = get_gpt_layer_local_spec()
    cross.submodules.cross_attention = get_gpt_layer_local_spec().submodules.self_attention
    new = S.tasp_layer_spec(cross)
    assert _core(new) is TaspDotProductAttention
    assert new.submodules.cross_attention.submodules.core_attention is not TaspDotProductAttention


def test_no_slot_raises():
    with pytest.raises(S.SpecError):
        S.tasp_layer_spec(ModuleSpec(module=torch.nn.Linear))
    assert S.tasp_layer_spec(ModuleSpec(module=torch.nn.Linear), strict=False).module is torch.nn.Linear


def test_options_become_module_spec_params():
    new = S.tasp_layer_spec(get_gpt_layer_local_spec(), num_rings=2, transport="p2p")
    ca = _core(new)
    assert isinstance(ca, ModuleSpec) and ca.module is TaspDotProductAttention
    assert ca.params == {"options": TaspOptions(num_rings=2, transport="p2p")}
    assert S.count_tasp_layers(new) == 1
    assert S.tasp_options_of(new) == [TaspOptions(num_rings=2, transport="p2p")]
    assert S.tasp_options_of(S.tasp_layer_spec(get_gpt_layer_local_spec())) == [None]
    # re-swapping without options keeps the spec's options; with options, the new ones win
    assert S.tasp_options_of(S.tasp_layer_spec(new)) == [TaspOptions(num_rings=2, transport="p2p")]
    assert S.tasp_options_of(S.tasp_layer_spec(new, num_rings=1)) == [TaspOptions(num_rings=1)]


def test_options_object_and_fields():
    opts = TaspOptions(num_rings=1, keep_kv=False, chunks=2)
    block_spec = S.tasp_layer_spec(get_gpt_layer_local_spec(), options=opts)
    assert _core(block_spec).params == {"options": opts}
    # fields on top of an options object; names may carry the tasp_ prefix; values go through parse_options
    both = S.tasp_layer_spec(get_gpt_layer_local_spec(), options=opts, transport="P2P", tasp_chunks="auto")
    assert _core(both).params["options"] == opts.replace(transport="p2p", chunks="auto")
    assert S.tasp_core_attention_spec() is TaspDotProductAttention
    assert S.tasp_core_attention_spec(keep_kv="off").params == {"options": TaspOptions(keep_kv=False)}
    with pytest.raises(TaspOptionError, match="unknown TASP option 'rings'"):
        S.tasp_layer_spec(get_gpt_layer_local_spec(), rings=2)
    with pytest.raises(TaspOptionError, match="chunks"):
        S.tasp_layer_spec(get_gpt_layer_local_spec(), chunks=0)
    with pytest.raises(TypeError, match="TaspOptions"):
        S.tasp_layer_spec(get_gpt_layer_local_spec(), options={"num_rings": 2})


def test_fields_take_the_environment_below_them(monkeypatch):
    monkeypatch.setenv("MEGATRON_TASP_CHUNKS", "3")
    monkeypatch.setenv("MEGATRON_TASP_TRANSPORT", "a2a")
    O.reload_env()
    new = S.tasp_layer_spec(get_gpt_layer_local_spec(), transport="p2p")
    assert _core(new).params["options"] == TaspOptions(chunks=3, transport="p2p")


def test_spec_options_build_the_module():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    opts = TaspOptions(num_rings=1, chunks=2)
    ca = _core(S.tasp_layer_spec(get_gpt_layer_local_spec(), options=opts))
    module = build_module(ca, config=tiny_config(1), layer_number=1, attn_mask_type=AttnMaskType.causal,
                          attention_type="self", cp_comm_type=None, softmax_scale=None, pg_collection=None)
    assert isinstance(module, TaspDotProductAttention) and module.options == opts


@pytest.mark.parametrize("fn", ["gpt_tasp_spec", "gpt_tasp_local_spec", "gpt_tasp_decoder_block_spec"])
def test_spec_functions_take_options(fn):
    opts = TaspOptions(num_rings=1, transport="p2p")
    extra = {"pp_rank": 0} if fn == "gpt_tasp_decoder_block_spec" else {}
    new = getattr(S, fn)(tiny_config(1), None, options=opts, **extra)
    assert S.tasp_options_of(new) and all(o == opts for o in S.tasp_options_of(new))
    assert S.tasp_options_of(getattr(S, fn)(tiny_config(1), None, **extra)) == [None] * S.count_tasp_layers(new)


def test_partial_built_self_attention():
    import functools

    base = get_gpt_layer_local_spec()
    sa = base.submodules.self_attention
    base.submodules.self_attention = functools.partial(sa.module, submodules=sa.submodules)
    new = S.tasp_layer_spec(base)
    assert new.submodules.self_attention.keywords["submodules"].core_attention is TaspDotProductAttention
    assert sa.submodules.core_attention is not TaspDotProductAttention
    assert S.count_tasp_layers(new) == 1


def test_bare_self_attention_spec():
    sa = get_gpt_layer_local_spec().submodules.self_attention
    assert S.tasp_layer_spec(sa).submodules.core_attention is TaspDotProductAttention


@pytest.mark.parametrize("fn", ["gpt_tasp_spec", "gpt_tasp_local_spec", "gpt_tasp_te_spec",
                                "gpt_tasp_decoder_block_spec"])
def test_spec_functions_take_config_and_vp_stage(fn):
    params = inspect.signature(getattr(S, fn)).parameters
    assert list(params)[:2] == ["config", "vp_stage"]


def test_gpt_tasp_spec_picks_local_without_te():
    cfg = tiny_config(1, qk_layernorm=True)
    new = S.gpt_tasp_spec(cfg, vp_stage=None)
    assert _core(new) is TaspDotProductAttention
    assert new.submodules.self_attention.submodules.q_layernorm is not None
    local = S.gpt_tasp_local_spec(cfg)
    assert _core(local) is TaspDotProductAttention


def test_gpt_tasp_te_spec_without_te():
    from megatron.core.extensions import transformer_engine as te_ext

    if getattr(te_ext, "HAVE_TE", False):
        pytest.skip("Transformer Engine installed")
    with pytest.raises(ImportError, match="Transformer Engine"):
        S.gpt_tasp_te_spec(tiny_config(1))


def test_package_exports():
    import megatron_tasp
    import megatron_tasp.megatron as M

    assert M.tasp_layer_spec is S.tasp_layer_spec
    assert M.TaspDotProductAttention is TaspDotProductAttention
    assert megatron_tasp.TaspDotProductAttention is TaspDotProductAttention
    assert callable(M.add_tasp_args) and callable(M.validate_tasp_args) and callable(M.enable_cpu_megatron)


def test_spec_functions_take_megatron_lm_args_options(monkeypatch):
    """Inside a Megatron-LM run (``--spec megatron_tasp.megatron.spec gpt_tasp_spec``) the validated
    ``--tasp-*`` flags (``get_args().tasp_options``) reach the spec; explicit ``options=`` win."""
    import sys
    import types

    from_args = TaspOptions(num_rings=1, keep_kv=False)
    fake = types.SimpleNamespace(get_args=lambda: types.SimpleNamespace(tasp_options=from_args))
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", fake)
    assert S.tasp_options_of(S.gpt_tasp_spec(tiny_config(1), None)) == [from_args]
    mine = TaspOptions(num_rings=1, chunks=2)
    assert S.tasp_options_of(S.gpt_tasp_local_spec(tiny_config(1), options=mine)) == [mine]

    def unset():
        raise AssertionError("args is not initialized.")

    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", types.SimpleNamespace(get_args=unset))
    assert S.tasp_options_of(S.gpt_tasp_local_spec(tiny_config(1))) == [None]
