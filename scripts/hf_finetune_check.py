"""Hugging Face weights in, long-context fine-tuning with TASP, Hugging Face weights out, checked end to end.

1. writes a randomly initialised Llama (transformers, byte vocabulary) as an HF directory;
2. fine-tunes it with ``megatron-tasp finetune`` from ``checkpoint.pretrained: hf:DIR`` on packed documents
   (this Python's standard library, byte tokenizer) at ``--seq`` tokens per sequence and CP = ``--cp`` TASP,
   ending with ``--hf-export``;
3. recomputes the run's first and last held-out losses with transformers (the original and the exported
   model, each document of every held-out pack on its own, the run's loss mask) and compares them with the
   losses Megatron reported.

GPU: ``python scripts/hf_finetune_check.py --out DIR`` (2 GPUs, 32K tokens, bf16). CPU smoke test:
``python scripts/hf_finetune_check.py --out DIR --device cpu --seq 256 --steps 3 --hidden 64 --layers 2``.
Writes ``DIR/hf-finetune-check.json`` (losses, throughput, the comparison) beside the run's own outputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml


def make_model(path: Path, a: argparse.Namespace) -> int:
    """A random Llama of the requested size saved as an HF directory; returns its parameter count."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=a.hidden, intermediate_size=a.ffn or int(a.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=0, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def write_recipe(path: Path, hf: Path, out: Path, a: argparse.Namespace) -> Path:
    from megatron_tasp.apps.hf.config import hf_model, read_config

    section = hf_model(read_config(hf)).section
    cfg = {
        "name": "hf-finetune-check", "seed": 1234, "model": section, "tokenizer": {"type": "byte"},
        "data": {"source": "stdlib", "max_bytes": a.max_bytes, "seq_length": a.seq, "eval_fraction": 0.02,
                 "packing": True, "cache_dir": str(out / "data_cache")},
        "parallel": {"cp": a.cp, "device": a.device},
        "train": {"steps": a.steps, "global_batch": 1, "micro_batch": 1,
                  "precision": "bf16" if a.device == "cuda" else "fp32", "lr": 3e-4, "min_lr": 3e-5,
                  "warmup_steps": max(1, a.steps // 10), "eval_interval": a.steps, "eval_batches": a.eval_batches},
        "checkpoint": {"save": False, "pretrained": f"hf:{hf}", "export_hf": str(out / "exported")},
        "logging": {"output_dir": str(out / "run"), "interval": max(1, a.steps // 20), "progress_bar": False,
                    "plot": True},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def hf_heldout_loss(model_dir: Path, recipe_path: Path, device: str) -> float:
    """transformers' per-token loss over the run's held-out packs: every document on its own, positions from 0,
    the run's loss mask (the quantity the fine-tuning run reports)."""
    import transformers

    from megatron_tasp.apps.finetune_lib.data import open_dataset
    from megatron_tasp.apps.finetune_lib.recipe import load_recipe
    from megatron_tasp.apps.finetune_lib.tokenizer import build_tokenizer

    recipe = load_recipe(recipe_path)
    data = open_dataset(recipe, build_tokenizer(recipe.tokenizer.type, recipe.tokenizer.name))
    # bf16 on GPU: fp32 attention over a 32K document falls back to a kernel that materialises the scores
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for pack in data.eval_samples(recipe.train.eval_batches):
            for i in range(len(pack.cu_seqlens) - 1):
                at, n = int(pack.cu_seqlens_padded[i]), int(pack.cu_seqlens[i + 1] - pack.cu_seqlens[i])
                if n == 0:
                    continue
                ids = torch.as_tensor(pack.tokens[at:at + n], device=device)[None]
                labels = torch.as_tensor(pack.labels[at:at + n], device=device)
                mask = torch.as_tensor(pack.loss_mask[at:at + n], device=device)
                logits = model(input_ids=ids).logits[0].float()
                loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                total += float((loss * mask).sum())
                count += float(mask.sum())
    return total / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32768, help="tokens per packed sequence (default 32768)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--max-bytes", type=int, default=12_000_000)
    ap.add_argument("--tol", type=float, default=None, help="relative loss tolerance (default 2e-2 on cuda/bf16, "
                    "1e-4 on cpu)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hf = out / "hf-llama"
    params = make_model(hf, a)
    recipe = write_recipe(out / "recipe.yaml", hf, out, a)
    t0 = time.time()
    rc = subprocess.call([sys.executable, "-m", "megatron_tasp.cli", "finetune", str(recipe)])
    wall = time.time() - t0
    rec: dict = {"params": params, "seq_length": a.seq, "cp": a.cp, "steps": a.steps, "rc": rc, "wall_s": wall,
                 "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "torch": torch.__version__}
    if rc == 0:
        m = json.loads((out / "run" / "metrics.json").read_text())
        evals = {e["step"]: e["loss"] for e in m["eval"]}
        first, last = min(evals), max(evals)
        rec.update(megatron_first_eval=evals[first], megatron_last_eval=evals[last],
                   train_losses=[s["loss"] for s in m["steps"]], summary=m.get("summary"))
        dev = "cuda" if a.device == "cuda" else "cpu"
        rec["hf_original_eval"] = hf_heldout_loss(hf, recipe, dev)
        rec["hf_exported_eval"] = hf_heldout_loss(out / "exported", recipe, dev)
        tol = a.tol if a.tol is not None else (2e-2 if a.device == "cuda" else 1e-4)
        rec["tolerance"] = tol
        rec["start_matches"] = abs(rec["hf_original_eval"] - evals[first]) <= tol * evals[first]
        rec["export_matches"] = abs(rec["hf_exported_eval"] - evals[last]) <= tol * evals[last]
        rec["ok"] = rec["start_matches"] and rec["export_matches"] and evals[last] < evals[first]
    (out / "hf-finetune-check.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("train_losses", "summary")}), flush=True)
    return 0 if rec.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
