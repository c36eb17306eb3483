"""The measurement scripts' own logic on CPU: the trace summary, the Megatron-LM bench's micro-batch sizes and its
SFT fixture."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _trace(path: Path, kernels: list[tuple[str, float, float]]) -> None:
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d} for n, t, d in kernels]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000})  # not a GPU event
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)


def test_trace_summary_categories_busy_and_cli(tmp_path, capsys):
    ts = _load("trace_summary")
    path = tmp_path / "rank-0.json.gz"
    _trace(path, [("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 0, 1000),  # times in us
                  ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 500, 1000),  # overlaps the first
                  ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 3000, 500),
                  ("_merge", 4000, 100), ("void at::native::elementwise_kernel<128, 4>", 4200, 200),
                  ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 10000, 2000)])
    s = ts.summarise(ts.load(str(path)), steps=2)
    assert s["kernel_ms_per_step"] == {"attention": 1.5, "gemm": 0.5, "nccl": 0.25, "other": 0.1,
                                       "tasp_merge": 0.05}
    assert s["span_ms_per_step"] == 6.0 and s["busy_ms_per_step"] == 2.15  # (1500 + 500 + 100 + 200 + 2000) / 2
    assert list(s["top_other_ms_per_step"]) == ["void at::native::elementwise_kernel<128, 4>"]
    out = tmp_path / "s.json"
    assert ts.main([str(path), "--steps", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == s and '"attention": 1.5' in capsys.readouterr().out


def test_trace_summary_without_kernels_is_a_one_line_error(tmp_path, capsys):
    ts = _load("trace_summary")
    path = tmp_path / "cpu.json.gz"
    _trace(path, [])
    with pytest.raises(SystemExit):
        ts.main([str(path)])
    assert "holds no GPU kernel events" in capsys.readouterr().err


def test_trace_summary_host_view_attributes_waits_and_counts_reentry_once():
    ts = _load("trace_summary")
    py = "python_function"
    events = [
        {"ph": "X", "cat": py, "name": "megatron/core/transformer/module.py(365): __call__", "ts": 0, "dur": 100},
        {"ph": "X", "cat": py, "name": "megatron/core/transformer/module.py(365): __call__", "ts": 10, "dur": 80},
        {"ph": "X", "cat": py, "name": "megatron_tasp/engine/thd.py(219): thd_layout", "ts": 20, "dur": 40},
        {"ph": "X", "cat": py, "name": "torch/nn/modules/module.py(1): _call_impl", "ts": 25, "dur": 30},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 30, "dur": 20},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 70, "dur": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 200, "dur": 4},  # no frame
    ]
    h = ts.host_summary(events, steps=1)
    assert h["runtime_per_step"]["cudaStreamSynchronize"] == {"calls": 2, "ms": 0.02}  # 24 us
    assert h["runtime_per_step"]["cudaLaunchKernel"] == {"calls": 1, "ms": 0.01}
    waits = h["waits_per_step"]
    inner = ("cudaStreamSynchronize @ megatron_tasp/engine/thd.py(219): thd_layout < "
             "megatron/core/transformer/module.py(365): __call__ < megatron/core/transformer/module.py(365): __call__")
    assert waits[inner] == {"calls": 1, "ms": 0.02}
    assert waits["cudaStreamSynchronize @ (no Megatron frame)"] == {"calls": 1, "ms": 0.0}
    funcs = h["heaviest_functions_ms_per_step"]
    assert funcs == {"megatron/core/transformer/module.py(365): __call__": 0.1,  # the outer call only
                     "megatron_tasp/engine/thd.py(219): thd_layout": 0.04}


def test_megatron_lm_bench_micro_batch_sizes():
    mb = _load("megatron_lm_bench")
    a = Namespace(micro_batch="one", nproc=2, tp=1, global_batch=2)
    assert mb.micro_batch(a, 1) == 1 and mb.micro_batch(a, 2) == 1
    a.micro_batch = "all"  # one micro-batch per step: DP=2 -> 1 sequence, CP=2 -> both sequences
    assert mb.micro_batch(a, 1) == 1 and mb.micro_batch(a, 2) == 2
    args = mb.model_args(Namespace(**vars(a), layers=2, hidden=64, heads=4, groups=2, iters=3, vocab=128,
                                   sft_data=None), 1024, 2)
    assert args[args.index("--micro-batch-size") + 1] == "2" and "--mock-data" in args
    a.global_batch = 3
    with pytest.raises(SystemExit, match="does not split"):
        mb.micro_batch(a, 1)


def test_megatron_lm_bench_code_must_hold_the_package(tmp_path, capsys):
    mb = _load("megatron_lm_bench")
    with pytest.raises(SystemExit):
        mb.main(["--code", str(tmp_path), "--out", str(tmp_path / "out.json")])
    assert "no megatron_tasp package there" in capsys.readouterr().err


def test_sft_fixture_feeds_megatrons_sft_tokenizer_and_the_bench(tmp_path, monkeypatch):
    """The fixture's tokenizer tokenizes its conversations through Megatron-Core's SFT tokenizer (system and user
    turns masked out of the loss), its datasets stand-in reads the lines back, and the bench runs --sft on it."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    if importlib.util.find_spec("megatron") is None:
        pytest.skip("megatron-core is not installed")
    from megatron_tasp.megatron.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    tokenizers_mod = pytest.importorskip("megatron.core.tokenizers")  # megatron-core >= 0.19
    fx = _load("make_sft_fixture")
    assert fx.main(["--out", str(tmp_path), "--lines", "3", "--seq", "512", "--mean", "120"]) == 0
    meta = json.loads((tmp_path / "fixture.json").read_text())
    assert meta["lines"] == 3 and meta["conversations_written"] > 3 and meta["vocab"] == len(fx.SPECIALS) + 3 + fx.WORDS
    monkeypatch.syspath_prepend(str(tmp_path / "stub"))
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    import datasets

    rows = datasets.load_dataset("json", data_files=str(tmp_path / "train.jsonl"), split="all")
    assert len(rows) == 3 and sum(m["role"] == "system" for m in rows[0]["messages"]) > 1  # several per line
    with pytest.raises(NotImplementedError):
        datasets.load_dataset("csv", data_files="x")
    tok = tokenizers_mod.MegatronTokenizer.from_pretrained(tokenizer_path=str(tmp_path / "tokenizer"),
                                                           metadata_path={"library": "sft"},
                                                           prompt_format="nemotron-h-aligned")
    conv = rows[0]["messages"][:3]
    ids, target = tok.tokenize_conversation(conv, return_target=True, add_generation_prompt=False)
    words = [len(m["content"].split()) for m in conv]
    assert len(ids) == sum(words) + 6  # role markers: "<SPECIAL_10> System", "<SPECIAL_11> User <SPECIAL_11> Assistant"
    masked = int((target == -100).sum())
    assert masked == words[0] + words[1] + 6 and tok.pad != tok.eod  # only the assistant turn is learned
    bench = _load("megatron_lm_bench")
    a = Namespace(sft_data=str(tmp_path), vocab=128)
    args = bench.data_args(a)
    assert "--sft" in args and "--mock-data" not in args
    assert args[args.index("--tokenizer-model") + 1] == str(tmp_path / "tokenizer")
    monkeypatch.setitem(sys.modules, "datasets", None)  # HF datasets missing: the stand-in goes on the path
    assert bench.sft_env(a)["PYTHONPATH"].split(":")[0] == str(tmp_path / "stub")
    a.code = str(tmp_path / "base")  # an A/B baseline: first on the path and the runs' working directory
    env, cwd = bench.child_setup(a)
    assert cwd == str(tmp_path / "base") and env["PYTHONPATH"].split(":")[:2] == [cwd, str(tmp_path / "stub")]


@pytest.mark.parametrize("pair", ["cudnn", "flash"])
def test_thd_layout_host_time_runs(tmp_path, pair):
    """The layout host-time script builds layouts for fresh mixes on two spawned gloo ranks with the stand-in of
    either varlen pair (it builds the blocks the engine would on CUDA) and writes its JSON."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, str(SCRIPTS / "thd_layout_host_time.py"), "--tokens", "2k", "--mixes", "3",
                          "--doc-mean", "256", "--pair", pair, "--port", str(port), "--out", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["pair"] == pair and got["rows"][0]["tokens"] == 2048 and len(got["rows"][0]["layout_ms"]) == 3
    assert "per new layout" in run.stdout


@pytest.mark.parametrize("name", sorted(p.stem for p in SCRIPTS.glob("*.py")))
def test_every_script_imports_and_prints_its_help(name, monkeypatch, capsys):
    """Each script (most need a GPU to run) imports on a CPU machine and its ``--help`` exits 0: a renamed or
    removed function of the package breaks it here, not on the GPU machine."""
    mod = _load(name)
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / f"{name}.py"), "--help"])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out
