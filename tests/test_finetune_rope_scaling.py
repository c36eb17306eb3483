"""model.rope_scaling in recipes: each kind's keys, the errors, overrides, the shipped 128K recipes and the
Megatron-Core plan each kind becomes (pure Python; tests/test_megatron_rope_scaling.py runs the models)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from megatron_tasp.apps.finetune_lib.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict
from megatron_tasp.apps.finetune_lib.rope import KEYS, megatron_rope
from megatron_tasp.apps.finetune_lib.sections import RopeScaling

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8 = ROOT / "configs" / "recipes" / "llama3-8b-128k-8xh100.yaml"  # this checkout's, not an installed copy
BASE = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 128},
    "data": {"seq_length": 256},
    "parallel": {"cp": 2},
    "train": {"steps": 4},
}
LLAMA31 = {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
           "original_max_position_embeddings": 8192}
YARN = {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 8192}


def _recipe(rope_scaling, **model):
    raw = copy.deepcopy(BASE)
    raw["model"].update(model, rope_scaling=rope_scaling)
    return recipe_from_dict(raw, source="r.yaml")


def test_default_is_none_and_plain_rope():
    r = recipe_from_dict(copy.deepcopy(BASE))
    assert r.model.rope_scaling == RopeScaling() and r.model.rope_scaling.rope_type == "none"
    assert megatron_rope(r.model).position_embedding_type == "rope"
    assert megatron_rope(r.model).seq_len_interpolation_factor is None and not megatron_rope(r.model).llama3
    assert _recipe(None).model.rope_scaling == RopeScaling()  # null = none
    plain = megatron_rope(_recipe(None, position_embedding="learned_absolute").model)
    assert plain.position_embedding_type == "learned_absolute"


def test_each_kind_becomes_its_megatron_plan():
    linear = megatron_rope(_recipe({"rope_type": "linear", "factor": 4}).model)
    assert (linear.position_embedding_type, linear.seq_len_interpolation_factor) == ("rope", 4.0)
    llama = megatron_rope(_recipe(LLAMA31).model)
    assert llama.position_embedding_type == "rope" and llama.seq_len_interpolation_factor is None
    assert llama.llama3 == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
    yarn = megatron_rope(_recipe(YARN).model)
    assert yarn.position_embedding_type == "yarn" and not yarn.llama3
    assert yarn.config_attributes == {
        "yarn_rotary_scaling_factor": 16.0, "yarn_original_max_position_embeddings": 8192, "yarn_beta_fast": 32.0,
        "yarn_beta_slow": 1.0, "yarn_mscale": None, "yarn_mscale_all_dim": None,
        "yarn_correction_range_round_to_int": True}
    full = dict(YARN, beta_fast=24, beta_slow=2, mscale=0.9, mscale_all_dim=0.8, truncate=False)
    attrs = megatron_rope(_recipe(full).model).config_attributes
    assert (attrs["yarn_beta_fast"], attrs["yarn_beta_slow"], attrs["yarn_mscale"], attrs["yarn_mscale_all_dim"],
            attrs["yarn_correction_range_round_to_int"]) == (24.0, 2.0, 0.9, 0.8, False)


def test_keys_are_hugging_faces():
    """The section's keys are the Hugging Face rope_scaling keys each kind uses."""
    fields = set(RopeScaling.__dataclass_fields__)
    assert fields == {"rope_type"} | {k for keys in KEYS.values() for k in keys}
    r = _recipe(dict(YARN, mscale=1.0, mscale_all_dim=1.0))
    again = recipe_from_dict(yaml.safe_load(r.to_yaml()), source="again")  # round trip through YAML
    assert again.model.rope_scaling == r.model.rope_scaling


@pytest.mark.parametrize("rope_scaling,extra,needle", [
    ({"rope_type": "ntk"}, {}, "model.rope_scaling.rope_type must be one of none, linear, llama3, yarn, got 'ntk'"),
    ({"rope_type": "default"}, {}, "model.rope_scaling.rope_type must be one of none, linear, llama3, yarn"),
    ("yarn", {}, "model.rope_scaling must be a mapping of fields, got str"),
    ({"rope_type": "yarn", "attention_factor": 1.2}, {}, "model.rope_scaling: unknown field(s) attention_factor; "
                                                         "allowed: rope_type, factor"),
    ({"rope_type": "linear"}, {}, "model.rope_scaling: rope_type linear needs factor"),
    ({"rope_type": "linear", "factor": 0.5}, {}, "model.rope_scaling.factor must be a number (>= 1) or null"),
    ({"factor": 8}, {}, "model.rope_scaling.factor is not a key of rope_type none (its keys: none)"),
    ({"rope_type": "linear", "factor": 2, "original_max_position_embeddings": 4096}, {},
     "model.rope_scaling.original_max_position_embeddings is not a key of rope_type linear (its keys: factor)"),
    (dict(LLAMA31, original_max_position_embeddings=None), {},
     "rope_type llama3 needs original_max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 8}, {},
     "rope_type llama3 needs low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    (dict(LLAMA31, beta_fast=32), {}, "model.rope_scaling.beta_fast is not a key of rope_type llama3"),
    (dict(LLAMA31, high_freq_factor=1), {}, "model.rope_scaling.high_freq_factor=1 must be larger than "
                                            "low_freq_factor=1"),
    (dict(LLAMA31, low_freq_factor=0), {}, "model.rope_scaling.low_freq_factor must be a number (> 0) or null"),
    ({"rope_type": "yarn", "factor": 16}, {}, "rope_type yarn needs original_max_position_embeddings"),
    (dict(YARN, low_freq_factor=1), {}, "model.rope_scaling.low_freq_factor is not a key of rope_type yarn"),
    (dict(YARN, mscale=1.0), {}, "model.rope_scaling: set both mscale and mscale_all_dim or neither"),
    (dict(YARN, mscale_all_dim=1.0), {}, "set both mscale and mscale_all_dim or neither"),
    (dict(YARN, mscale=0, mscale_all_dim=1.0), {}, "model.rope_scaling.mscale must be a number (> 0) or null"),
    (dict(YARN, beta_fast=1, beta_slow=2), {}, "model.rope_scaling.beta_fast=1 must be larger than beta_slow=2"),
    (dict(YARN, beta_slow=40), {}, "model.rope_scaling.beta_fast=32 must be larger than beta_slow=40"),
    (dict(YARN, truncate="yes"), {}, "model.rope_scaling.truncate must be true or false or null"),
    (dict(YARN, original_max_position_embeddings=4098), {},
     "original_max_position_embeddings=4098 must be a multiple of 2 * parallel.cp = 4"),
    (YARN, {"rotary_percent": 0.5}, "rope_type yarn rotates the whole head dim (megatron-core's "
                                    "YarnRotaryEmbedding); set model.rotary_percent: 1"),
    ({"rope_type": "linear", "factor": 2}, {"position_embedding": "learned_absolute"},
     "model.rope_scaling needs model.position_embedding: rope (got learned_absolute)"),
])
def test_errors_name_the_key_and_the_fix(rope_scaling, extra, needle):
    with pytest.raises(RecipeError) as err:
        _recipe(rope_scaling, **extra)
    assert needle in str(err.value), str(err.value)
    assert str(err.value).startswith("r.yaml: ") and "\n" not in str(err.value)


def test_overrides_reach_nested_keys():
    r = load_recipe(LLAMA_8, ["model.rope_scaling.factor=16"])
    assert r.model.rope_scaling == RopeScaling(**dict(LLAMA31, factor=16.0))
    r = load_recipe(LLAMA_8, ["model.rope_scaling={rope_type: yarn, factor: 16, "
                                              "original_max_position_embeddings: 8192}"])
    assert r.model.rope_scaling == RopeScaling(rope_type="yarn", factor=16.0, original_max_position_embeddings=8192)
    assert load_recipe(LLAMA_8, ["model.rope_scaling=null"]).model.rope_scaling == RopeScaling()
    raw = apply_overrides(BASE, ["model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=2"])
    assert BASE["model"].get("rope_scaling") is None  # the input is not modified
    assert recipe_from_dict(raw).model.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)
    for bad, needle in (("model.rope_scaling.alpha=1", "unknown field model.rope_scaling.alpha; allowed: rope_type, "
                                                       "factor,"),
                        ("model.hidden_size.x=1", "model.hidden_size has no fields; use model.hidden_size=VALUE"),
                        ("model.rope_sclaing.factor=2", "unknown field model.rope_sclaing"),
                        ("model.rope_scaling.factor.x=2", "key must be section.field (or section.field.key")):
        with pytest.raises(RecipeError, match=bad.split("=")[0].replace(".", r"\.")) as err:
            apply_overrides(BASE, [bad])
        assert needle in str(err.value), str(err.value)
    with pytest.raises(RecipeError, match="model.rope_scaling is not a mapping"):
        apply_overrides(dict(BASE, model=dict(BASE["model"], rope_scaling="yarn")), ["model.rope_scaling.factor=2"])


def test_shipped_128k_recipes_follow_llama_3_1():
    for name in ("llama3-8b-128k-8xh100", "llama3-8b-128k-2x8xh100"):
        r = load_recipe(ROOT / "configs" / "recipes" / f"{name}.yaml")
        assert r.model.rotary_base == 500000.0 and r.data.seq_length == 131072
        assert r.model.rope_scaling == RopeScaling(**LLAMA31)
