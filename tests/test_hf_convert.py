"""Hugging Face Llama-family weights <-> Megatron checkpoints: tiny random ``transformers`` models (built here,
saved with save_pretrained) are converted with ``megatron-tasp convert``, loaded into the fine-tuning app's own
GPTModel, and their logits compared with HF's at CP=1 and at CP=2 (TASP attention, the app's zigzag split,
gathered logits), fp32, relative error <= 1e-5; then exported back and loaded by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests import megatron_helpers as H

transformers = H.require_hf_checkpointing()
pytestmark = pytest.mark.megatron

from megatron_tasp.apps.hf.config import hf_model, read_config  # noqa: E402
from megatron_tasp.cli import main as cli_main  # noqa: E402
from megatron_tasp.launch import run_workers  # noqa: E402

SEQ, BATCH, TOL = 32, 2, 1e-5
PADDED = ("llama-gqa", "qwen2")  # converted with --vocab-multiple 128
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, rms_norm_eps=1e-5, max_position_embeddings=128)
VARIANTS = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=50000.0), None),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4), None),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), None),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, head_dim=8), None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False), None),
    "mistral-sharded": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None), "40KB"),
    # RoPE scaling with an original context of 16 < SEQ, so the scaled frequencies matter (Llama 3.1, YaRN)
    "llama31-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), None),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}), None),
}


def make_hf(path: Path, variant: str, seed: int = 0) -> Path:
    """A tiny random HF model saved as safetensors (sharded when the variant says so)."""
    cfg_name, model_name, extra, shard = VARIANTS[variant]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**{**BASE, **extra})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random norms and biases, so a swapped or dropped tensor shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def _cli_worker(rank: int, world: int, argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def convert(*argv: str) -> tuple[int, str, str]:
    """``megatron-tasp convert ARGV`` in a forked one-rank world: (exit code, stdout, stderr).

    A process that has created and destroyed a gloo group cannot fork working Megatron ranks afterwards, so the
    test process never creates one itself."""
    return run_workers(_cli_worker, 1, ["convert", *argv], timeout_s=300)[0]


def tokens(vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _recipe(section: dict, hf_dir: Path, cp: int):
    from megatron_tasp.apps.finetune_lib.recipe import recipe_from_dict

    return recipe_from_dict({"model": section, "data": {"seq_length": SEQ}, "train": {"steps": 1},
                             "tokenizer": {"type": "huggingface", "name": str(hf_dir)},
                             "parallel": {"cp": cp, "device": "cpu"}})


def logits_worker(rank: int, world: int, opts: dict) -> dict:
    """Megatron logits at CP = world (TASP) and CP = 1 (DP = world) from the converted checkpoint, gathered."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tasp.apps.finetune_lib import checkpoint as ckpt
    from megatron_tasp.apps.finetune_lib.data import model_inputs
    from megatron_tasp.apps.finetune_lib.model import build_model, transformer_config

    out = {}
    for cp in (world, 1):
        ps.initialize_model_parallel(context_parallel_size=cp)
        try:
            recipe = _recipe(opts["section"], opts["hf_dir"], cp)
            config = transformer_config(recipe, torch.device("cpu"))
            _, core = build_model(recipe, config, opts["section"]["vocab_size"], torch.device("cpu"))
            found = ckpt.find_checkpoint(opts["ckpt"])
            core.load_state_dict(ckpt.load_checkpoint(found, {"model": core.sharded_state_dict()})["model"])
            group = ps.get_context_parallel_group()
            batch = model_inputs(opts["ids"].numpy(), group, torch.device("cpu"))
            with torch.no_grad():
                local = core(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)
            kinds = {type(m).__name__ for m in core.modules() if "DotProductAttention" in type(m).__name__}
            parts = [torch.empty_like(local) for _ in range(cp)]
            dist.all_gather(parts, local.contiguous(), group=group)
            full = torch.empty(BATCH, SEQ, local.shape[-1])
            for r, part in enumerate(parts):
                full[:, H.zigzag_positions(r, cp, local.shape[1])] = part
            out[cp] = {"logits": full, "attention": sorted(kinds)}
        finally:
            ps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf_at_cp1_and_cp2_and_export_round_trips(variant, tmp_path):
    hf = make_hf(tmp_path / "hf", variant)
    padded = variant in PADDED
    rc, printed, err = convert("hf-to-mcore", str(hf), str(tmp_path / "mc"), *(["--vocab-multiple", "128"]
                                                                                if padded else []))
    assert rc == 0, err
    section = yaml.safe_load(printed)["model"]
    # the printed section is the one the checkpoint has; the vocabulary is padded only when asked
    assert section == hf_model(read_config(hf), 128 if padded else 1).section
    assert section["vocab_size"] == (128 if padded else 100)
    assert ("take part in Megatron's softmax" in err) == padded
    ids = tokens(100)
    want = hf_logits(hf, ids[:, :-1])
    res = run_workers(logits_worker, 2, {"section": section, "hf_dir": hf, "ckpt": tmp_path / "mc", "ids": ids},
                      timeout_s=300)[0]
    for cp in (2, 1):
        got = res[cp]["logits"]
        assert res[cp]["attention"] == ["TaspDotProductAttention"]
        assert got.shape[-1] == section["vocab_size"] and torch.all(got[..., 100:] == 0)  # padded rows are zero
        err = rel_err(got[..., :100], want)
        assert err <= TOL, (variant, cp, err)

    assert convert("mcore-to-hf", str(tmp_path / "mc"), str(tmp_path / "back"))[0] == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["vocab_size"] == 100 and back["architectures"] == read_config(hf)["architectures"]
    assert (tmp_path / "back" / "generation_config.json").is_file()
    assert rel_err(hf_logits(tmp_path / "back", ids[:, :-1]), want) <= 1e-6


def test_sharded_input_is_read_from_the_index(tmp_path):
    hf = make_hf(tmp_path / "hf", "mistral-sharded")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded


def test_export_writes_shards_with_an_index(tmp_path):
    """A small shard limit gives several safetensors files and model.safetensors.index.json that HF reads."""
    hf = make_hf(tmp_path / "hf", "qwen2")
    assert convert("hf-to-mcore", str(hf), str(tmp_path / "mc"), "--dtype", "fp32")[0] == 0
    assert convert("mcore-to-hf", str(tmp_path / "mc"), str(tmp_path / "back"), "--max-shard-gb",
                   str(60e3 / 2**30))[0] == 0
    out = tmp_path / "back"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    ids = tokens(100)
    assert rel_err(hf_logits(out, ids[:, :-1]), hf_logits(hf, ids[:, :-1])) <= 1e-6
