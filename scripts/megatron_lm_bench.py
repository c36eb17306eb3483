"""Megatron-LM end to end: CP=2 TASP against CP=1 / DP=2 (TASP kernels) on the same GPUs, same tokens per step.

Runs Megatron-LM's own ``pretrain_gpt.py`` (through ``megatron_tasp.megatron.pretrain_gpt``, no patch needed,
or a patched checkout with ``--entry patched``) once per (sequence length, layout), mock data, bf16, and
records Megatron's own numbers (iteration time, TFLOP/s/GPU, loss) as JSON (``--sft-data DIR``: Megatron-LM's
``--sft`` path on the fixture of ``scripts/make_sft_fixture.py`` instead of mock data)::

    export MEGATRON_LM_PATH=/path/to/Megatron-LM          # pretrain_gpt.py, gpt_builders.py, model_provider.py
    python scripts/megatron_lm_bench.py --seq 16384,32768 --out docs/benchmarks/DATE-h200x2-megatron-lm.json

Both layouts process ``global_batch`` sequences of ``seq`` tokens per step on ``nproc`` GPUs, so the tokens per
GPU per step are equal: CP=2 splits every sequence over the two GPUs, DP=2 gives each GPU whole sequences.
Medians skip the first ``--warmup`` iterations. ``--code DIR`` runs another copy of megatron_tasp (a directory
holding the package, e.g. ``git archive REV megatron_tasp | tar -x -C DIR`` for an A/B): the runs start in DIR
with DIR first on PYTHONPATH, because ``python -m`` imports from the working directory before PYTHONPATH.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)")
TFLOPS_RE = re.compile(r"throughput per GPU \(TFLOP/s/GPU\): ([\d.]+)")
LOSS_RE = re.compile(r"lm loss: ([\d.E+-]+)")


def micro_batch(a: argparse.Namespace, cp: int) -> int:
    """Micro-batch size of a layout: 1, or with ``--micro-batch all`` the whole per-replica batch (one
    micro-batch per step in every layout, so both layouts pay Megatron's per-micro-batch host cost once)."""
    if a.micro_batch == "one":
        return 1
    dp = a.nproc // (cp * a.tp)
    if dp < 1 or a.global_batch % dp:
        raise SystemExit(f"--global-batch {a.global_batch} does not split over {dp} data-parallel replicas")
    return a.global_batch // dp


def model_args(a: argparse.Namespace, seq: int, cp: int) -> list[str]:
    """The GPT model and training flags shared by every layout (the micro-batch size per ``micro_batch``)."""
    return [
        "--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--ffn-hidden-size", str(4 * a.hidden),
        "--num-attention-heads", str(a.heads), "--group-query-attention", "--num-query-groups", str(a.groups),
        "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--position-embedding-type", "rope",
        "--micro-batch-size", str(micro_batch(a, cp)), "--global-batch-size", str(a.global_batch),
        "--train-iters", str(a.iters), "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "constant",
        "--bf16", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--seed", "1234",
        *data_args(a),
        "--transformer-impl", "local", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
        "--log-interval", "1", "--log-throughput", "--eval-iters", "0", "--eval-interval", str(10 * a.iters),
        "--split", "100,0,0", "--distributed-backend", "nccl",
    ]


def data_args(a: argparse.Namespace) -> list[str]:
    """Mock data with a null tokenizer, or with ``--sft-data DIR`` Megatron-LM's SFT path on the fixture of
    ``scripts/make_sft_fixture.py`` (packed chat conversations, one document each, loss on assistant turns)."""
    if not a.sft_data:
        return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(a.vocab)]
    d = Path(a.sft_data).absolute()
    return ["--sft", "--data-path", str(d / "train.jsonl"), "--tokenizer-type", "SFTTokenizer",
            "--tokenizer-model", str(d / "tokenizer"), "--sft-tokenizer-prompt-format", "nemotron-h-aligned"]


def sft_env(a: argparse.Namespace) -> dict[str, str]:
    """Environment additions of an SFT run: the fixture's ``datasets`` stand-in when HF datasets is missing."""
    if not a.sft_data:
        return {}
    try:
        import datasets  # noqa: F401
        return {}
    except ImportError:
        stub = str(Path(a.sft_data) / "stub")
        print(f"HF datasets is not installed: the SFT runs read the JSON lines through {stub}/datasets", flush=True)
        return {"PYTHONPATH": os.pathsep.join(x for x in (stub, os.environ.get("PYTHONPATH", "")) if x)}


def layout_args(cp: int, tp: int) -> list[str]:
    """Flags of one layout: CP=2 TASP, or CP=1 with TASP kernels (data parallel over the other GPUs)."""
    return ["--context-parallel-size", str(cp), "--tensor-model-parallel-size", str(tp),
            "--context-parallel-backend", "tasp"]


def child_setup(a: argparse.Namespace) -> tuple[dict[str, str], str | None]:
    """Environment additions and working directory of the Megatron-LM runs: the SFT stand-in (``sft_env``)
    and, with ``--code DIR``, DIR first on PYTHONPATH and as the working directory."""
    env = sft_env(a)
    if not getattr(a, "code", None):
        return env, None
    code = str(Path(a.code).absolute())
    rest = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (code, rest) if x)
    return env, code


def run_one(a: argparse.Namespace, seq: int, cp: int, log_dir: Path) -> dict:
    """One Megatron-LM run; returns its record (or the failure with the log's tail)."""
    entry = ["-m", "megatron_tasp.megatron.pretrain_gpt"] if a.entry == "launcher" else \
        [str(Path(os.environ["MEGATRON_LM_PATH"]).absolute() / "pretrain_gpt.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
           "--master-port", str(29500 + cp + seq % 97), *entry, *model_args(a, seq, cp), *layout_args(cp, a.tp),
           *a.extra]
    extra_env, cwd = child_setup(a)
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1", **extra_env)
    log = log_dir / f"megatron-lm-{a.tag}seq{seq}-cp{cp}-tp{a.tp}-mb{micro_batch(a, cp)}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=a.timeout, cwd=cwd)
    text = log.read_text(errors="replace")
    iters, tflops, losses = [], [], []
    for line in text.splitlines():
        m = ITER_RE.search(line)
        if not m:
            continue
        it, ms = int(m.group(1)), float(m.group(2))
        t = TFLOPS_RE.search(line)
        lo = LOSS_RE.search(line)
        losses.append(float(lo.group(1)) if lo else None)
        if it > a.warmup:
            iters.append(ms)
            if t:
                tflops.append(float(t.group(1)))
    rec = {"impl": "megatron_lm", "entry": a.entry, "cp": cp, "tp": a.tp, "dp": a.nproc // (cp * a.tp),
           "seq_length": seq, "micro_batch_size": micro_batch(a, cp), "extra_flags": a.extra,
           "global_batch": a.global_batch, "layers": a.layers, "hidden": a.hidden, "heads": a.heads,
           "query_groups": a.groups, "data": "sft" if a.sft_data else "mock", "rc": rc,
           "wall_s": round(time.time() - t0, 1), "losses": losses, "code": cwd,
           "log": log.name}
    if rc != 0 or not iters:
        rec["error_tail"] = text[-3000:]
        return rec
    iter_ms = statistics.median(iters)
    tokens_per_gpu = a.global_batch * seq / a.nproc
    rec.update(iter_ms=round(iter_ms, 2), iter_ms_all=iters, tokens_per_gpu_per_step=tokens_per_gpu,
               tokens_per_s_per_gpu=round(tokens_per_gpu / (iter_ms / 1e3), 1),
               tflops_per_gpu=round(statistics.median(tflops), 1) if tflops else None)
    return rec


def versions() -> dict:
    """Card and library versions of this machine."""
    import torch

    out = {"torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
           "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name(0),
           "gpus": torch.cuda.device_count()}
    try:
        from importlib.metadata import version

        out["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001 - an unpacked wheel may carry no metadata
        import megatron.core

        out["megatron_core"] = getattr(megatron.core, "__version__", "unknown")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="16384,32768", help="comma-separated sequence lengths (default 16384,32768)")
    p.add_argument("--cps", default="1,2", help="CP sizes to run (default 1,2; CP=1 is data parallel)")
    p.add_argument("--nproc", type=int, default=2, help="GPUs (default 2)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every run (default 1)")
    p.add_argument("--tag", default="", help="prefix of the log file names")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=4, help="query groups (KV heads)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--micro-batch", choices=("one", "all"), default="one",
                   help="micro-batch size 1 (default), or the whole per-replica batch ('all': CP=2 then runs one "
                        "micro-batch of two sequences per step, as DP=2 runs one of one)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="iterations left out of the medians")
    p.add_argument("--entry", choices=("launcher", "patched"), default="launcher",
                   help="launcher: python -m megatron_tasp.megatron.pretrain_gpt; patched: a patched pretrain_gpt.py")
    p.add_argument("--sft-data", default=None, metavar="DIR",
                   help="run Megatron-LM's --sft on the fixture scripts/make_sft_fixture.py wrote to DIR (packed "
                        "chat conversations, per-document masks) instead of mock data")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--code", default=None, metavar="DIR",
                   help="run the megatron_tasp package in DIR (e.g. an A/B baseline) instead of the installed one")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--log-dir", default=None, help="where the Megatron logs go (default: beside --out)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more Megatron-LM flags for every run")
    a = p.parse_args(argv)
    a.extra = [x for x in a.extra if x != "--"]
    if a.code and not (Path(a.code) / "megatron_tasp" / "__init__.py").is_file():
        p.error(f"--code {a.code}: no megatron_tasp package there (git archive REV megatron_tasp | tar -x -C DIR)")
    if "MEGATRON_LM_PATH" not in os.environ:
        p.error("set MEGATRON_LM_PATH to a directory with Megatron-LM's pretrain_gpt.py")
    out = Path(a.out)
    log_dir = Path(a.log_dir) if a.log_dir else out.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for seq in (int(s) for s in a.seq.split(",")):
        for cp in (int(c) for c in a.cps.split(",")):
            rec = run_one(a, seq, cp, log_dir)
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k not in ("iter_ms_all", "losses", "error_tail")}),
                  flush=True)
            if "error_tail" in rec:
                print(rec["error_tail"][-1500:], flush=True)
    result = {"date": datetime.date.today().isoformat(), "machine": versions(), "records": records}
    if a.sft_data and (Path(a.sft_data) / "fixture.json").exists():
        result["sft_fixture"] = json.loads((Path(a.sft_data) / "fixture.json").read_text())
    by = {(r["seq_length"], r["cp"]): r for r in records if "iter_ms" in r}  # one TP size per invocation
    ratios = {}
    for seq in {r["seq_length"] for r in records}:
        base, tasp = by.get((seq, 1)), by.get((seq, 2))
        if base and tasp:
            ratios[str(seq)] = round(tasp["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], 3)
    result["cp2_over_cp1_tokens_per_s"] = ratios
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("CP=2 / CP=1 tokens/s per GPU:", ratios)
    return 0 if all("iter_ms" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
