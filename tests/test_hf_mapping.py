"""Hugging Face <-> Megatron mapping without Megatron: config.json -> recipe model section (both RoPE spellings,
every refusal), tensor names of the local and Transformer Engine specs, the fused layouts, and the CLI's one-line
errors that need no conversion."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_tasp.apps.hf.config import (
    HFConfigError,
    check_recipe,
    export_config,
    hf_model,
    section_yaml,
)
from megatron_tasp.apps.hf.weights import (
    Layout,
    detect_naming,
    fuse_qkv,
    hf_names,
    hf_to_megatron,
    megatron_names,
    megatron_to_hf,
    split_qkv,
)
from megatron_tasp.cli import main as cli_main

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
         "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_qkv_rows_are_grouped_q_heads_then_k_then_v():
    # heads 4, groups 2, head_dim 1: rows q0 q1 k0 v0 | q2 q3 k1 v1
    q, k, v = torch.tensor([[0.], [1.], [2.], [3.]]), torch.tensor([[10.], [11.]]), torch.tensor([[20.], [21.]])
    fused = fuse_qkv(q, k, v, heads=4, groups=2, head_dim=1)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    bias = fuse_qkv(q.flatten(), k.flatten(), v.flatten(), 4, 2, 1)  # 1-D biases follow the same order
    assert bias.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    for a, b in zip(split_qkv(fused, 4, 2, 1), (q, k, v)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="linear_qkv has 6 rows"):
        split_qkv(fused[:6], 4, 2, 1)


@pytest.mark.parametrize("naming", ["local", "te"])
@pytest.mark.parametrize("tied,qkv_bias,linear_bias", [(False, False, False), (True, True, False),
                                                       (False, False, True)])
def test_names_and_round_trip(naming, tied, qkv_bias, linear_bias):
    layout = Layout(num_layers=2, heads=4, groups=2, head_dim=8, vocab=100, padded_vocab=128, tied=tied,
                    qkv_bias=qkv_bias, linear_bias=linear_bias, naming=naming)
    shapes = {"embed_tokens": (100, 32), "lm_head": (100, 32), "q_proj": (32, 32), "k_proj": (16, 32),
              "v_proj": (16, 32), "o_proj": (32, 32), "gate_proj": (48, 32), "up_proj": (48, 32),
              "down_proj": (32, 48)}
    gen = torch.Generator().manual_seed(0)
    hf = {}
    for name in hf_names(layout):
        part = name.split(".")[-2]
        shape = (32,) if "norm" in name else shapes[part]
        hf[name] = torch.randn(shape[:1] if name.endswith("bias") else shape, generator=gen)
    mc = dict(hf_to_megatron(hf.__getitem__, layout))
    assert sorted(mc) == sorted(megatron_names(layout)) and detect_naming(mc) == naming
    assert mc["embedding.word_embeddings.weight"].shape == (128, 32)
    assert torch.all(mc["embedding.word_embeddings.weight"][100:] == 0)
    assert ("output_layer.weight" in mc) == (not tied)
    norm = "self_attention.linear_qkv.layer_norm_weight" if naming == "te" else "input_layernorm.weight"
    assert torch.equal(mc[f"decoder.layers.1.{norm}"], hf["model.layers.1.input_layernorm.weight"])
    fc1 = mc["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:48], hf["model.layers.0.mlp.gate_proj.weight"])  # [gate; up]
    back = dict(megatron_to_hf(mc.__getitem__, layout))
    assert back.keys() == hf.keys() and all(torch.equal(back[n], hf[n]) for n in hf)


def test_config_to_section_both_rope_spellings():
    v4 = hf_model(dict(LLAMA, rope_theta=500000.0, rope_scaling=None), vocab_multiple=128)
    v5 = hf_model(dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert v4.section == dict(v5.section, vocab_size=128) and v5.section["vocab_size"] == 100
    assert v5.section["rotary_base"] == 500000.0 and v5.dtype == "bf16" and v5.rope_scaling is None
    assert (v5.section["num_query_groups"], v5.section["kv_channels"]) == (2, 16)
    qwen = hf_model(dict(LLAMA, architectures=["Qwen2ForCausalLM"], sliding_window=4096, use_sliding_window=False))
    assert (qwen.section["add_qkv_bias"], qwen.section["add_bias_linear"]) == (True, False)
    mistral = hf_model(dict(LLAMA, architectures=["MistralForCausalLM"], sliding_window=None, head_dim=32))
    assert mistral.section["kv_channels"] == 32
    assert "num_query_groups: 2" in section_yaml(v5) and "rope_scaling" not in v5.section
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    for cfg in (dict(LLAMA, rope_theta=500000.0, rope_scaling=llama31),  # Meta-Llama-3.1's config.json
                dict(LLAMA, rope_parameters=dict(llama31, rope_theta=500000.0))):
        assert hf_model(cfg).section["rope_scaling"] == llama31
    linear = hf_model(dict(LLAMA, rope_scaling={"type": "linear", "factor": 2.0}))  # the older key 'type'
    assert linear.section["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture GPT2LMHeadModel; supported: "
                                             "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window=4096 is not supported"),
    ({"attention_bias": True}, "attention_bias/mlp_bias=(True, False) is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope scaling of type 'dynamic' is not supported (model.rope_scaling serves linear, llama3, yarn)"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "attention_factor": 1.2,
                          "original_max_position_embeddings": 4096}},
     "rope scaling key(s) attention_factor of type 'yarn' have no model.rope_scaling field"),
])
def test_unsupported_configs_fail_closed(change, message):
    with pytest.raises(HFConfigError) as info:
        hf_model(dict(LLAMA, **change), where="x/config.json")
    assert message in str(info.value) and str(info.value).startswith("x/config.json: ")


def test_recipe_check_names_the_first_differing_field():
    from megatron_tasp.apps.finetune_lib.recipe import recipe_from_dict

    model = hf_model(LLAMA)
    raw = {"model": dict(model.section), "data": {"seq_length": 8}, "train": {"steps": 1},
           "tokenizer": {"type": "huggingface", "name": "unused"}}
    check_recipe(recipe_from_dict(raw), model, vocab=100)
    for field, value in (("num_query_groups", 4), ("norm_epsilon", 1e-6), ("tie_embeddings", True),
                         ("ffn_hidden_size", 128)):
        bad = recipe_from_dict(dict(raw, model=dict(model.section, **{field: value})))
        with pytest.raises(HFConfigError, match=rf"model\.{field}={value!r} but the Hugging Face checkpoint has"):
            check_recipe(bad, model, vocab=100)
    with pytest.raises(HFConfigError, match="model vocabulary .99. is smaller than config.json's vocab_size .100."):
        check_recipe(recipe_from_dict(raw), model, vocab=99)
    # RoPE may differ (context extension): reported, not refused
    assert check_recipe(recipe_from_dict(raw), model, vocab=128) == []
    scaled = {"rope_type": "linear", "factor": 4.0}
    extended = recipe_from_dict(dict(raw, model=dict(model.section, rope_scaling=scaled, rotary_base=1e6)))
    assert check_recipe(extended, model, vocab=100) == [
        "model.rotary_base: 10000.0 in config.json, 1000000.0 in the recipe",
        "model.rope_scaling: None in config.json, {'rope_type': 'linear', 'factor': 4.0} in the recipe"]
    with_rope = hf_model(dict(LLAMA, rope_scaling=scaled))
    assert check_recipe(recipe_from_dict(dict(raw, model=dict(with_rope.section))), with_rope, vocab=100) == []


def test_export_config_keeps_the_base_and_refuses_another_shape():
    section = dict(hf_model(LLAMA).section)
    assert export_config(section, 128, 64, base=LLAMA, dtype="bfloat16") == dict(
        LLAMA, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64)
    v5 = dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=4096)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 4096}
    extended = export_config(dict(section, rotary_base=5e5, rope_scaling=llama3), 128, 32768, base=v5)
    assert extended["rope_parameters"] == dict(llama3, rope_theta=5e5)  # the trained model's RoPE, base's spelling
    assert extended["max_position_embeddings"] == 32768 and "rope_scaling" not in extended
    gen = export_config(section, 128, 64)
    assert gen["architectures"] == ["LlamaForCausalLM"] and gen["vocab_size"] == 128
    assert (gen["num_key_value_heads"], gen["head_dim"], gen["attention_bias"]) == (2, 16, False)
    with pytest.raises(HFConfigError, match="base config.json has hidden_size=64 but the checkpoint's model"):
        export_config(dict(section, hidden_size=128), 128, 64, base=LLAMA)
    with pytest.raises(HFConfigError, match="model.activation='gelu': Hugging Face Llama-family export needs swiglu"):
        export_config(dict(section, activation="gelu"), 128, 64)


def _err(capsys, argv: list[str]) -> str:
    assert cli_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert _err(capsys, ["convert", "hf-to-mcore", str(tmp_path / "nope"), str(tmp_path / "out")]).endswith(
        "nope: no such directory (expected a Hugging Face model directory with config.json)")
    assert "no config.json" in _err(capsys, ["convert", "hf-to-mcore", str(tmp_path), str(tmp_path / "out")])
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, architectures=["FalconForCausalLM"])))
    msg = _err(capsys, ["convert", "hf-to-mcore", str(tmp_path), "--print-section"])
    assert msg.startswith("megatron-tasp convert: error: ") and "supported: LlamaForCausalLM" in msg
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert "give OUT_DIR" in _err(capsys, ["convert", "hf-to-mcore", str(tmp_path)])
    assert cli_main(["convert", "hf-to-mcore", str(tmp_path), "--print-section"]) == 0
    assert "hidden_size: 64" in capsys.readouterr().out
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    pytest.importorskip("safetensors")
    from megatron_tasp.apps.hf.io import SafetensorsReader

    with pytest.raises(HFConfigError, match="found pytorch_model.bin: re-save the model with save_pretrained"):
        SafetensorsReader(tmp_path)


def test_cli_help_names_both_directions(capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert", "--help"])
    text = capsys.readouterr().out
    assert "hf-to-mcore" in text and "mcore-to-hf" in text and "Qwen2ForCausalLM" in text
