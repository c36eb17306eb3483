"""Fine-tuning recipes: schema validation errors, overrides, shipped recipes, CLI parsing, docs; data pipeline."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_tasp.apps import finetune as ft
from megatron_tasp.apps.finetune_lib import data as D
from megatron_tasp.apps.finetune_lib.recipe import (
    SECTIONS,
    RecipeError,
    apply_overrides,
    list_recipes,
    load_recipe,
    parse_value,
    recipe_from_dict,
    recipes_dir,
    schema_text,
)
from megatron_tasp.apps.finetune_lib.tokenizer import ByteTokenizer
from megatron_tasp.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 128},
    "data": {"seq_length": 256},
    "parallel": {"cp": 2},
    "train": {"steps": 4},
}


def _with(path: str, value):
    raw = copy.deepcopy(BASE)
    sec, _, key = path.partition(".")
    if key:
        raw.setdefault(sec, {})[key] = value
    else:
        raw[sec] = value
    return raw


def test_minimal_recipe_defaults():
    r = recipe_from_dict(copy.deepcopy(BASE))
    assert (r.parallel.tp, r.parallel.cp, r.parallel.dp, r.parallel.cp_backend) == (1, 2, None, "tasp")
    assert (r.tokenizer.type, r.data.source, r.train.optimizer, r.checkpoint.resume) == ("byte", "stdlib", "adamw",
                                                                                         "auto")
    assert r.kv_channels == 16 and r.query_groups == 2 and r.padded_vocab_size(256) == 256
    assert r.standalone_world_size == 2 and r.resolve_world(2) == 1
    assert r.checkpoint_dir() == r.output_dir() / "checkpoints"


@pytest.mark.parametrize("raw_path,value,needle", [
    ("model.num_layers", "four", "model.num_layers must be an integer"),
    ("model.num_layers", 0, "model.num_layers must be an integer (>= 1)"),
    ("model.hidden_sise", 64, "unknown field(s) hidden_sise"),
    ("model.num_query_groups", 3, "model.num_attention_heads=4 must be a multiple of model.num_query_groups=3"),
    ("model.hidden_size", 66, "model.hidden_size=66 is not divisible by model.num_attention_heads=4"),
    ("model.position_embedding", "alibi", "model.position_embedding must be one of rope, learned_absolute"),
    ("model.vocab_size", 100, "model.vocab_size=100 is smaller than the byte tokenizer's 256"),
    ("model.vocab_size", "big", "model.vocab_size must be an integer or 'auto'"),
    ("model.add_bias_linear", "yes", "model.add_bias_linear must be true or false"),
    ("data.seq_length", 250, "data.seq_length=250 must be a multiple of 2 * parallel.cp = 4"),
    ("data.source", "files", "data.path is required for data.source: files"),
    ("data.eval_fraction", 0.7, "data.eval_fraction must be in [0, 0.5)"),
    ("parallel.tp", 2, "parallel.tp=2: tensor parallelism is not supported"),
    ("parallel.cp_backend", "p2p", "parallel.cp_backend must be one of tasp, ring"),
    ("parallel.num_rings", 2, "parallel.num_rings=2 but generic-2 offers at most 1"),
    ("parallel.topology", "h100-sxm-8", "parallel.topology 'h100-sxm-8' describes 8 GPUs but parallel.cp=2"),
    ("parallel.topology", "no-such-topology", "parallel.topology: topology file 'no-such-topology' not found"),
    ("tokenizer.type", "huggingface", "tokenizer.name is required for tokenizer.type: huggingface"),
    ("train.lr", "fast", "train.lr must be a number"),
    ("train.betas", [0.9], "train.betas must be two numbers"),
    ("train.warmup_steps", 9, "train.warmup_steps=9 exceeds train.steps=4"),
    ("train.global_batch", 3, "train.global_batch=3 must be a multiple of train.micro_batch=2"),
    ("train.precision", "fp8", "train.precision must be one of fp32, bf16"),
    ("checkpoint.interval", -1, "checkpoint.interval must be an integer (>= 0)"),
    ("logging", [1, 2], "logging must be a mapping of fields"),
    ("extra", {}, "unknown section(s) extra"),
])
def test_validation_errors_name_the_field(raw_path, value, needle):
    raw = _with(raw_path, value)
    if raw_path == "train.global_batch":
        raw["train"]["micro_batch"] = 2
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw, source="r.yaml")
    assert needle in str(err.value), str(err.value)
    assert str(err.value).startswith("r.yaml")


def test_missing_required_fields_and_sections():
    raw = copy.deepcopy(BASE)
    del raw["model"]["hidden_size"]
    with pytest.raises(RecipeError, match=r"model.hidden_size: missing required field"):
        recipe_from_dict(raw)
    raw = copy.deepcopy(BASE)
    del raw["train"]
    with pytest.raises(RecipeError, match="missing required section 'train'"):
        recipe_from_dict(raw)
    with pytest.raises(RecipeError, match="must be a mapping of sections"):
        recipe_from_dict([1, 2])


def test_ring_backend_and_world_checks():
    r = recipe_from_dict(_with("parallel.cp_backend", "ring"))
    assert r.num_rings == 1
    raw = _with("parallel.dp", 2)
    raw["train"]["global_batch"] = 2
    r = recipe_from_dict(raw)
    assert r.standalone_world_size == 4
    with pytest.raises(RecipeError, match="train.global_batch=1 must be a multiple of parallel.dp \\* "):
        recipe_from_dict(_with("parallel.dp", 2))
    with pytest.raises(RecipeError, match="world size 3 is not a multiple of parallel.tp \\* parallel.cp = 2"):
        r.resolve_world(3)
    with pytest.raises(RecipeError, match="parallel.dp=2 but 6 processes with tp\\*cp=2 give dp=3"):
        r.resolve_world(6)
    r = recipe_from_dict(_with("train.global_batch", 1))
    with pytest.raises(RecipeError, match="train.global_batch=1 must be a multiple of dp \\* train.micro_batch"):
        r.resolve_world(4)
    with pytest.raises(RecipeError, match="model.vocab_size=300 is smaller than the tokenizer's vocabulary"):
        recipe_from_dict(_with("model.vocab_size", 300)).padded_vocab_size(1000)


def test_parallel_section_becomes_one_tasp_options():
    r = recipe_from_dict(_with("parallel", {"cp": 2, "num_rings": "auto", "transport": "p2p", "keep_kv": False,
                                            "chunks": 2}))
    o = r.tasp_options()
    assert (o.num_rings, o.transport, o.keep_kv, o.chunks) == ("auto", "p2p", False, 2)
    assert recipe_from_dict(_with("parallel.packed_dense_rows", 1024)).tasp_options().packed_dense_rows == 1024
    assert recipe_from_dict(_with("parallel.packed_kernel", "flash")).tasp_options().packed_kernel == "flash"
    with pytest.raises(RecipeError, match="packed_kernel"):
        recipe_from_dict(_with("parallel.packed_kernel", "fa3"))
    assert recipe_from_dict(_with("parallel.cp_backend", "ring")).tasp_options().num_rings == 1
    # A combination TASP rejects is reported against the recipe file.
    bad = _with("parallel", {"cp": 2, "transport": "symm", "keep_kv": True})
    with pytest.raises(RecipeError, match=r"keep_kv=True needs per-call KV buffers.*\(r.yaml: parallel\)$"):
        recipe_from_dict(bad, source="r.yaml")


def test_parse_value_and_overrides():
    assert parse_value("1e-4") == pytest.approx(1e-4) and isinstance(parse_value("1e-4"), float)
    assert parse_value("4") == 4 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("[0.9, 0.99]") == [0.9, 0.99] and parse_value("h100-sxm-8") == "h100-sxm-8"
    out = apply_overrides(BASE, ["train.lr=1e-4", "parallel.cp=4", "data.seq_length=512", "seed=7",
                                 "checkpoint.resume=never"])
    assert BASE["train"] == {"steps": 4}  # the input is not modified
    r = recipe_from_dict(out)
    assert (r.train.lr, r.parallel.cp, r.data.seq_length, r.seed, r.checkpoint.resume) == (1e-4, 4, 512, 7, "never")
    for bad, needle in (("train.lr", "must look like section.key=value"),
                        ("train.learning_rate=1", "unknown field train.learning_rate"),
                        ("optim.lr=1", "section one of"), ("a.b.c=1", "section one of")):
        with pytest.raises(RecipeError, match=re.escape(needle)):
            apply_overrides(BASE, [bad])
    # An override that produces an invalid recipe is reported like a file error.
    with pytest.raises(RecipeError, match="data.seq_length=256 must be a multiple of 2 \\* parallel.cp = 6"):
        recipe_from_dict(apply_overrides(BASE, ["parallel.cp=3"]))


def test_shipped_recipes_all_validate():
    names = list_recipes()
    assert {"default-cpu", "llama3-8b-128k-8xh100", "llama3-8b-128k-2x8xh100"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name
        # A recipe survives a round trip through its resolved YAML.
        again = recipe_from_dict(yaml.safe_load(r.to_yaml()), source=name)
        assert again.to_dict() == r.to_dict()


def test_default_recipe_is_long_context_cp4_on_cpu():
    r = load_recipe(None)
    assert r.name == "default-cpu"
    assert r.data.seq_length >= 4096 and r.parallel.cp == 4 and r.parallel.cp_backend == "tasp"
    assert r.tokenizer.type == "byte" and r.data.source == "stdlib" and r.parallel.device == "cpu"
    assert r.logging.plot and r.logging.progress_bar
    assert (recipes_dir() / "default-cpu.yaml").is_file()


def test_llama_recipes_have_the_llama3_8b_shape():
    from megatron_tasp.apps.finetune_lib.model import estimate_parameters

    one, two = load_recipe("llama3-8b-128k-8xh100"), load_recipe("llama3-8b-128k-2x8xh100")
    for r in (one, two):
        m = r.model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
                m.vocab_size, m.rotary_base, m.position_embedding) == (32, 4096, 32, 8, 14336, 128256, 500000.0,
                                                                        "rope")
        assert r.data.seq_length == 131072 and r.train.precision == "bf16" and r.parallel.cp_backend == "tasp"
        assert 8.0e9 < estimate_parameters(r, 128256) < 8.1e9
    assert (one.parallel.cp, one.standalone_world_size, one.parallel.topology) == (8, 8, "h100-sxm-8")
    assert (two.parallel.cp, two.standalone_world_size, two.parallel.topology) == (16, 16, "h100-sxm-8x2")
    # The alternative 16-GPU layout named in the recipe's comments is valid too.
    alt = load_recipe("llama3-8b-128k-2x8xh100", ["parallel.cp=8", "parallel.dp=2", "parallel.topology=h100-sxm-8"])
    assert alt.standalone_world_size == 16


def test_schema_and_docs_cover_every_field():
    text = schema_text()
    docs = (ROOT / "docs" / "FINETUNE.md").read_text(encoding="utf-8")
    import dataclasses

    for sec, cls in SECTIONS.items():
        assert f"\n{sec}:" in "\n" + text
        for f in dataclasses.fields(cls):
            assert f"  {f.name}:" in text
            assert f"{f.name}:" in docs, f"docs/FINETUNE.md does not document {sec}.{f.name}"
    assert text in docs, "docs/FINETUNE.md's schema block is stale: paste megatron-tasp finetune --schema"
    assert "schema" in ft.__doc__.lower() and "train:" in ft.__doc__


def test_cli_check_schema_list_and_errors(capsys, tmp_path):
    assert cli_main(["finetune", "--schema"]) == 0
    assert "seq_length: REQUIRED" in capsys.readouterr().out
    assert cli_main(["finetune", "--list"]) == 0
    assert "llama3-8b-128k-8xh100" in capsys.readouterr().out
    # Overrides may come before or after options (intermixed).
    assert cli_main(["finetune", "llama3-8b-128k-2x8xh100", "--max-steps", "3", "train.lr=1e-4", "--check",
                     "parallel.cp=8", "parallel.dp=2", "parallel.topology=h100-sxm-8"]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "lr: 0.0001" in out and "8.030B parameters" in out
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_with("model.num_query_groups", 3)))
    assert cli_main(["finetune", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err
    assert "model.num_attention_heads=4 must be a multiple of model.num_query_groups=3" in err
    assert "Traceback" not in err
    assert cli_main(["finetune", "no-such-recipe", "--check"]) == 2
    assert "recipe 'no-such-recipe' not found" in capsys.readouterr().err
    assert cli_main(["finetune", "a.yaml", "b.yaml", "--check"]) == 2
    assert "at most one CONFIG" in capsys.readouterr().err
    cfg.write_text("model: [unclosed\n")
    assert cli_main(["finetune", str(cfg), "--check"]) == 2
    assert "malformed YAML at line" in capsys.readouterr().err


def test_cli_help_is_clear(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["finetune", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for needle in ("CONFIG | KEY=VALUE", "--max-steps N", "--default", "default recipe", "torchrun", "examples:",
                   "--check", "--schema", "checkpoint"):
        assert needle in out, needle


# ------------------------------------------------------------------------------------------------------------
# Data pipeline (numpy only)
# ------------------------------------------------------------------------------------------------------------

def test_dataset_windows_split_and_order_are_deterministic():
    tokens = np.arange(10 * 16 + 1, dtype=np.int64) % 251
    ds = D.SequenceDataset(tokens, seq_length=16, eval_fraction=0.2, seed=3)
    assert ds.num_train + len(ds.eval_windows) == 10
    assert set(ds.train_windows).isdisjoint(set(ds.eval_windows)) and len(ds.eval_windows) == 2
    epoch0 = [ds.train_window_index(i) for i in range(ds.num_train)]
    assert sorted(epoch0) == sorted(ds.train_windows.tolist())  # each window once per epoch
    epoch1 = [ds.train_window_index(ds.num_train + i) for i in range(ds.num_train)]
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0
    again = D.SequenceDataset(tokens, seq_length=16, eval_fraction=0.2, seed=3)
    assert [again.train_window_index(i) for i in range(12)] == [ds.train_window_index(i) for i in range(12)]
    w = ds.train_samples(5, 3)
    assert w.shape == (3, 17)
    first = ds.train_window_index(5)
    assert w[0].tolist() == tokens[first * 16:first * 16 + 17].tolist()  # inputs + shifted labels
    assert ds.eval_samples(5).shape == (2, 17)
    with pytest.raises(RecipeError, match="fewer than two sequences"):
        D.SequenceDataset(tokens[:20], seq_length=16, eval_fraction=0.0, seed=0)


def test_corpus_sources_and_cache(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file")
    r = recipe_from_dict(_with("data", {"seq_length": 4, "source": "files", "path": str(tmp_path / "**" / "*.txt")}))
    tok = ByteTokenizer()
    toks = D.tokenize_corpus(r, tok)
    assert bytes(toks.tolist()) == b"hello world\n\x00second file\x00"
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"body": "x" * 10}) + "\n\n" + json.dumps({"body": "yz"}) + "\n")
    r = recipe_from_dict(_with("data", {"seq_length": 4, "source": "jsonl", "path": str(jl), "text_field": "body",
                                        "max_bytes": 11}))
    assert bytes(D.tokenize_corpus(r, tok).tolist()) == b"x" * 10 + b"\x00yz\x00"
    bad = recipe_from_dict(_with("data", {"seq_length": 4, "source": "jsonl", "path": str(jl)}))
    with pytest.raises(RecipeError, match="data.text_field: .*docs.jsonl:1 has no field 'text'"):
        D.tokenize_corpus(bad, tok)
    missing = recipe_from_dict(_with("data", {"seq_length": 4, "source": "files", "path": str(tmp_path / "*.md")}))
    with pytest.raises(RecipeError, match="matches no file"):
        D.tokenize_corpus(missing, tok)
    # The cache is keyed by content metadata and reused.
    r = recipe_from_dict(_with("data", {"seq_length": 4, "source": "files", "path": str(tmp_path / "a.txt"),
                                        "cache_dir": str(tmp_path / "cache")}))
    p1 = D.build_token_cache(r, tok)
    assert p1.is_file() and D.build_token_cache(r, tok) == p1
    assert np.load(p1).tolist() == list(b"hello world\n\x00")
    assert D.stdlib_files() and all(p.suffix == ".py" for p in D.stdlib_files()[:20])


def test_find_checkpoint_pointers(tmp_path):
    from megatron_tasp.apps.finetune_lib import checkpoint as ckpt

    assert ckpt.find_checkpoint(tmp_path) is None
    done = tmp_path / ckpt.iter_name(12)
    done.mkdir()
    (done / "metadata.json").write_text("{}")
    (done / ckpt.MARKER).write_text('{"step": 12}')
    (tmp_path / "latest").write_text("12\n")
    assert ckpt.find_checkpoint(tmp_path) == done and ckpt.find_checkpoint(done) == done
    assert ckpt.read_marker(done)["step"] == 12
    (tmp_path / "latest").write_text("13\n")  # points at a missing checkpoint
    with pytest.raises(ckpt.CheckpointError, match="iter_0000013, which is missing or incomplete"):
        ckpt.find_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("twelve")
    with pytest.raises(ckpt.CheckpointError, match="expected a step number"):
        ckpt.find_checkpoint(tmp_path)
    # A Megatron-LM checkpoint directory: latest_checkpointed_iteration.txt -> iter_XXXXXXX (torch_dist).
    mlm = tmp_path / "mlm"
    (mlm / "iter_0000500").mkdir(parents=True)
    (mlm / "iter_0000500" / "metadata.json").write_text("{}")
    (mlm / "latest_checkpointed_iteration.txt").write_text("500")
    assert ckpt.find_checkpoint(mlm) == mlm / "iter_0000500" and ckpt.read_marker(mlm / "iter_0000500") == {}
