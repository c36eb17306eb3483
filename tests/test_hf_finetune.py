"""``megatron-tasp finetune`` with Hugging Face weights: ``checkpoint.pretrained: hf:DIR`` (converted on the fly
into a cache and checked against the recipe) and ``checkpoint.export_hf`` / ``--hf-export`` (the run ends by
writing an HF directory). Held-out losses of the run are compared with transformers' loss of the same windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests import megatron_helpers as H

transformers = H.require_hf_checkpointing()
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.megatron

from megatron_tasp.apps.finetune_lib.data import SequenceDataset, load_tokens  # noqa: E402
from megatron_tasp.apps.finetune_lib.recipe import load_recipe  # noqa: E402
from megatron_tasp.apps.finetune_lib.tokenizer import build_tokenizer  # noqa: E402
from megatron_tasp.apps.hf.config import hf_model, read_config  # noqa: E402
from megatron_tasp.cli import main as cli_main  # noqa: E402
from tests.test_hf_convert import convert  # noqa: E402

SEQ, TOL = 64, 1e-5


def make_hf_dir(path: Path) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer of its own (trained here, offline) in one directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [p.read_text(errors="replace") for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                      rms_norm_eps=1e-5, eos_token_id=fast.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def recipe_file(tmp: Path, model: dict, tokenizer: dict, **checkpoint) -> Path:
    cfg = {"name": "hf-tiny", "model": model, "tokenizer": tokenizer,
           "data": {"source": "stdlib", "packing": False, "max_bytes": 150000, "seq_length": SEQ, "eval_fraction": 0.05,
                    "cache_dir": str(tmp / "cache")},
           "parallel": {"cp": 2, "device": "cpu"},
           "train": {"steps": 2, "global_batch": 2, "lr": 1e-3, "eval_batches": 2},
           "checkpoint": checkpoint, "logging": {"progress_bar": False, "plot": False}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def hf_eval_loss(model_dir: Path, recipe_path: Path) -> float:
    """transformers' mean next-token loss over the run's held-out windows."""
    recipe = load_recipe(recipe_path)
    tok = build_tokenizer(recipe.tokenizer.type, recipe.tokenizer.name)
    data = SequenceDataset(load_tokens(recipe, tok), SEQ, recipe.data.eval_fraction, recipe.seed)
    ids = torch.as_tensor(data.eval_samples(recipe.train.eval_batches).astype("int64"))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-llama")


def test_finetune_from_hf_dir_exports_hf(hf_dir, tmp_path):
    section = hf_model(read_config(hf_dir)).section
    assert section["vocab_size"] == 300  # exact: padded rows would take part in Megatron's softmax
    cfg = recipe_file(tmp_path, section, {"type": "huggingface", "name": str(hf_dir)}, pretrained=f"hf:{hf_dir}")
    out, export = tmp_path / "run", tmp_path / "exported"
    assert cli_main(["finetune", str(cfg), f"logging.output_dir={out}", "--hf-export", str(export)]) == 0
    m = metrics(out)
    assert "converted into" in m["initialized_from"]
    cache = sorted((out / "hf_import").iterdir())
    assert len(cache) == 1 and (cache[0] / "latest").is_file()
    evals = {e["step"]: e["loss"] for e in m["eval"]}
    want = hf_eval_loss(hf_dir, cfg)  # the run starts from exactly the HF weights (CP=2, TASP)
    assert abs(evals[0] - want) <= TOL * want, (evals[0], want)

    exported = json.loads((export / "config.json").read_text())
    assert exported["vocab_size"] == 300 and exported["architectures"] == ["LlamaForCausalLM"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in export.iterdir()}
    got = hf_eval_loss(export, cfg)  # the trained weights, as transformers computes with them
    assert abs(evals[2] - got) <= TOL * got and abs(got - want) > 1e-3, (evals[2], got, want)

    # A fresh start from the same HF directory loads the cached conversion; RoPE may differ from config.json
    # (context extension), and the exported config.json then carries the recipe's RoPE.
    rope = "{rope_type: linear, factor: 2.0}"
    assert cli_main(["finetune", str(cfg), f"logging.output_dir={out}", "checkpoint.resume=never", "train.steps=1",
                     "checkpoint.save=false", f"model.rope_scaling={rope}", f"checkpoint.export_hf={export}2"]) == 0
    again = metrics(out)
    assert again["initialized_from"] == str(cache[0] / "iter_0000000")
    assert again["eval"][0]["loss"] != evals[0]  # the same weights under another RoPE
    exported = json.loads((tmp_path / "exported2" / "config.json").read_text())
    assert exported["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    got = hf_eval_loss(tmp_path / "exported2", cfg)
    assert abs(again["eval"][-1]["loss"] - got) <= TOL * got, (again["eval"], got)


def test_recipe_that_differs_from_config_json_is_refused(hf_dir, tmp_path, capsys):
    section = dict(hf_model(read_config(hf_dir)).section, norm_epsilon=1e-6)
    cfg = recipe_file(tmp_path, section, {"type": "huggingface", "name": str(hf_dir)}, pretrained=f"hf:{hf_dir}")
    assert cli_main(["finetune", str(cfg), f"logging.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.norm_epsilon=1e-06 but the Hugging Face checkpoint has 1e-05" in err[0], err


def test_random_init_run_exports_a_generated_llama_config(tmp_path):
    """Without HF provenance config.json is generated from the recipe (here with Llama 3.1 RoPE scaling); the
    trainer's checkpoint dir converts too."""
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
             "ffn_hidden_size": 96, "rotary_base": 500000.0, "rope_scaling": rope}
    cfg = recipe_file(tmp_path, model, {"type": "byte"}, export_hf=str(tmp_path / "exported"))
    out = tmp_path / "run"
    assert cli_main(["finetune", str(cfg), f"logging.output_dir={out}"]) == 0
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["vocab_size"] == 256
    assert exported["rope_scaling"] == rope and exported["rope_theta"] == 500000.0
    final = metrics(out)["eval"][-1]
    got = hf_eval_loss(tmp_path / "exported", cfg)
    assert final["step"] == 2 and abs(final["loss"] - got) <= TOL * got, (final, got)

    rc, _, err = convert("mcore-to-hf", str(out / "checkpoints"), str(tmp_path / "from-ckpt"))
    assert rc == 0, err
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("exported", "from-ckpt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
