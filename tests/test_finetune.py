"""``megatron-tasp finetune`` end to end on CPU/gloo: short default run, exact resume, CP resharding, crash-safe
checkpoints, weights-only start, and the torchrun entry point.

A tiny GPT (2 layers, hidden 64, seq 256, stdlib bytes) keeps every run at a few seconds on 2 cores. The
reference run (CP=2, 6 steps, 2 sequences per step, checkpoints after steps 3 and 6) is shared by the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import megatron_helpers as H

H.require_megatron()
pytest.importorskip("psutil", reason="megatron.core.dist_checkpointing needs psutil to save checkpoints")
pytestmark = pytest.mark.megatron

from megatron_tasp.apps.finetune_lib import checkpoint as ckpt  # noqa: E402
from megatron_tasp.apps.finetune_lib.launch import run_forked  # noqa: E402
from megatron_tasp.apps.finetune_lib.recipe import load_recipe  # noqa: E402
from megatron_tasp.apps.finetune_lib.trainer import RunOptions  # noqa: E402
from megatron_tasp.cli import main as cli_main  # noqa: E402
from megatron_tasp.launch import WorkerError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 128},
    "data": {"source": "stdlib", "max_bytes": 300000, "seq_length": 256, "eval_fraction": 0.05},
    "parallel": {"cp": 2, "device": "cpu"},
    "train": {"steps": 6, "global_batch": 2, "micro_batch": 1, "lr": 3e-3, "warmup_steps": 1, "eval_batches": 2},
    "checkpoint": {"interval": 3, "keep_last": 0},
    "logging": {"progress_bar": False, "plot": True, "interval": 1},
}
EXACT = 1e-6  # resumed losses equal uninterrupted ones (bit-exact in practice on CPU)


def _losses(out: Path) -> list[float]:
    return [s["loss"] for s in json.loads((out / "metrics.json").read_text())["steps"]]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    cfg = dict(TINY, data=dict(TINY["data"], cache_dir=str(path.parent / "cache")))
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tiny_cfg, tmp_path_factory) -> Path:
    """The uninterrupted run: CP=2, 6 steps, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("reference")
    assert cli_main(["finetune", str(tiny_cfg), f"logging.output_dir={out}"]) == 0
    return out


def test_reference_run_outputs(reference):
    m = _metrics(reference)
    assert (m["cp"], m["dp"], m["world_size"], m["end_step"]) == (2, 1, 2, 6)
    assert len(m["steps"]) == 6 and m["steps"][-1]["loss"] < m["steps"][0]["loss"]
    assert abs(m["steps"][0]["loss"] - 5.545) < 0.15  # ~ln(256) at random init
    # One numbering everywhere: step N = after N optimizer steps (train records, evaluations, checkpoints).
    assert [s["step"] for s in m["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in m["eval"]] == [0, 6]
    assert [s["consumed_samples"] for s in m["steps"]] == [2 * s["step"] for s in m["steps"]]
    assert m["checkpoints"] == [str(reference / "checkpoints" / f"iter_{n:07d}") for n in (3, 6)]
    assert m["stopped_by"] is None
    from importlib.metadata import version

    assert m["megatron_core_version"] == version("megatron-core")  # the release, not a commit
    root = reference / "checkpoints"
    assert (root / "latest").read_text().strip() == "6"
    assert ckpt.is_complete(root / "iter_0000003") and ckpt.is_complete(root / "iter_0000006")
    marker = ckpt.read_marker(root / "iter_0000006")
    assert (marker["step"], marker["cp"], marker["consumed_samples"]) == (6, 2, 12)
    assert not list(root.glob(".tmp-*"))
    assert (reference / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_schedule_is_megatrons(reference):
    """OptimizerParamScheduler, advanced before each step: warmup ends at step 1, min_lr (0) at the last step."""
    lrs = [s["lr"] for s in _metrics(reference)["steps"]]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:])), lrs


def test_resume_equals_uninterrupted(tiny_cfg, reference, tmp_path):
    out = tmp_path / "resumed"
    start = reference / "checkpoints" / "iter_0000003"
    assert cli_main(["finetune", str(tiny_cfg), f"logging.output_dir={out}", f"checkpoint.resume={start}"]) == 0
    m = _metrics(out)
    assert m["resumed_from"] == str(start) and [s["step"] for s in m["steps"]] == [4, 5, 6]
    ref = _losses(reference)[3:]
    got = _losses(out)
    assert all(abs(a - b) <= EXACT for a, b in zip(ref, got, strict=True)), (ref, got)
    assert abs(m["eval"][-1]["loss"] - _metrics(reference)["eval"][-1]["loss"]) <= EXACT


def test_max_steps_then_auto_resume(tiny_cfg, reference, tmp_path):
    out = tmp_path / "stop-go"
    assert cli_main(["finetune", str(tiny_cfg), "--max-steps", "2", f"logging.output_dir={out}"]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "2"  # saved where --max-steps stopped
    assert cli_main(["finetune", str(tiny_cfg), f"logging.output_dir={out}"]) == 0  # resume: auto
    m = _metrics(out)
    assert [s["step"] for s in m["steps"]] == list(range(1, 7))  # history kept across the restart
    assert all(abs(a - b) <= EXACT for a, b in zip(_losses(reference), _losses(out), strict=True))


@pytest.mark.parametrize("cp,dp", [(4, 1), (1, 2)])
def test_checkpoint_saved_at_cp2_loads_at_other_layouts(tiny_cfg, reference, tmp_path, cp, dp):
    out = tmp_path / f"cp{cp}dp{dp}"
    start = reference / "checkpoints" / "iter_0000003"
    assert cli_main(["finetune", str(tiny_cfg), f"parallel.cp={cp}", f"parallel.dp={dp}", f"logging.output_dir={out}",
                     f"checkpoint.resume={start}"]) == 0
    m = _metrics(out)
    assert (m["cp"], m["dp"]) == (cp, dp)
    ref, got = _losses(reference)[3:], _losses(out)
    assert all(abs(a - b) < 2e-5 for a, b in zip(ref, got, strict=True)), (ref, got)


@pytest.mark.parametrize("stage", ["written", "committed"])
def test_crash_during_save_keeps_last_good_checkpoint(tiny_cfg, reference, tmp_path, stage):
    """Kill every rank in the middle of the second save; the first checkpoint stays the resumable one."""
    out = tmp_path / f"crash-{stage}"
    recipe = load_recipe(tiny_cfg, [f"logging.output_dir={out}"])
    calls = {"n": 0}

    def crash(where: str) -> None:
        if where == stage:
            calls["n"] += 1
            if calls["n"] == 2:  # the save after step 6
                os._exit(17)

    with pytest.raises(WorkerError):  # the killed ranks never report; the others lose their peer
        run_forked(recipe, RunOptions(fault_hook=crash, log=False), 2)
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "3"
    assert ckpt.find_checkpoint(root) == root / "iter_0000003" and ckpt.is_complete(root / "iter_0000003")
    if stage == "written":  # data on disk but never committed: only a temporary directory exists
        assert not (root / "iter_0000006").exists() and len(list(root.glob(".tmp-iter_0000006-*"))) == 1
    else:  # renamed but 'latest' not yet updated: a complete, unreferenced directory
        assert ckpt.is_complete(root / "iter_0000006") and not list(root.glob(".tmp-*"))
    # Restart: resumes from step 3, redoes steps 3..5 exactly, and the save at 6 cleans up.
    assert cli_main(["finetune", str(tiny_cfg), f"logging.output_dir={out}"]) == 0
    assert _metrics(out)["resumed_from"] == str(root / "iter_0000003")
    assert all(abs(a - b) <= EXACT for a, b in zip(_losses(reference), _losses(out), strict=True))
    assert (root / "latest").read_text().strip() == "6" and ckpt.is_complete(root / "iter_0000006")
    assert not list(root.glob(".tmp-*"))


def test_pretrained_weights_start_a_fresh_run(tiny_cfg, reference, tmp_path):
    out = tmp_path / "finetuned"
    assert cli_main(["finetune", str(tiny_cfg), f"logging.output_dir={out}", "train.steps=2", "checkpoint.save=false",
                     f"checkpoint.pretrained={reference / 'checkpoints'}"]) == 0
    m = _metrics(out)
    assert m["initialized_from"] == str(reference / "checkpoints" / "iter_0000006") and m["resumed_from"] is None
    assert [s["step"] for s in m["steps"]] == [1, 2]
    # Same weights, same held-out windows: the first evaluation equals the reference's last one.
    assert abs(m["eval"][0]["loss"] - _metrics(reference)["eval"][-1]["loss"]) <= EXACT
    assert not (out / "checkpoints").exists()


def test_default_recipe_short_run(tmp_path):
    """The embedded default (CP=4 TASP, byte GPT) with --max-steps 3 and smaller sizes: bar, log, JSON, plot."""
    out = tmp_path / "default"
    argv = ["finetune", "--max-steps", "3", "--output-dir", str(out), "data.seq_length=512",
            "data.max_bytes=300000", "model.num_layers=2", "train.eval_batches=1", "logging.interval=1"]
    assert cli_main(argv) == 0
    m = _metrics(out)
    assert (m["recipe"], m["cp"], m["world_size"], m["cp_backend"], m["end_step"]) == ("default-cpu", 4, 4, "tasp", 3)
    assert len(m["steps"]) == 3 and all(s["tokens_per_s"] > 0 for s in m["steps"])
    assert abs(m["first_loss"] - 5.545) < 0.15 and m["last_loss"] < m["first_loss"]
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoints" / "latest").read_text().strip() == "3"


def test_torchrun_entry_point(tiny_cfg, tmp_path):
    """scripts/launch_torchrun.sh -> torchrun -> one rank per process (the path Slurm jobs take)."""
    out = tmp_path / "out"
    torchrun = tmp_path / "torchrun.sh"  # this interpreter's torchrun, whatever is first on PATH
    torchrun.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    torchrun.chmod(0o755)
    env = dict(os.environ, NPROC="2", OMP_NUM_THREADS="1", TORCHRUN=str(torchrun),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = ["bash", str(ROOT / "scripts" / "launch_torchrun.sh"), "finetune", str(tiny_cfg), "--max-steps", "2",
           f"logging.output_dir={out}", "checkpoint.save=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    m = _metrics(out)
    assert (m["world_size"], m["end_step"]) == (2, 2)
    assert "step     2/6" in proc.stdout


def _gpu_recipe_on_cpu(tmp_path: Path, *overrides: str):
    """The 2-GPU recipe (gpt-403m-h200x2-cp2) shrunk to CPU sizes; the code path is the CPU one."""
    small = ["parallel.device=cpu", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
             "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_length=64", "data.max_bytes=300000",
             f"data.cache_dir={tmp_path / 'cache'}", "train.steps=3", "train.warmup_steps=1", "train.eval_batches=0",
             "checkpoint.save=false", "logging.plot=false"]
    return load_recipe("gpt-403m-h200x2-cp2", [*small, *overrides])


def test_gpu_recipe_cp2_and_cp1_dp2_follow_the_same_trajectory(tmp_path):
    """CP=2 and CP=1 x DP=2 see the same tokens per step: the losses agree (the 2-GPU recipe's comparison)."""
    opts = RunOptions(log=False)
    cp2 = run_forked(_gpu_recipe_on_cpu(tmp_path, "train.precision=fp32", f"logging.output_dir={tmp_path / 'a'}"),
                     opts, 2)
    cp1 = run_forked(_gpu_recipe_on_cpu(tmp_path, "train.precision=fp32", "parallel.cp=1", "parallel.dp=2",
                                        f"logging.output_dir={tmp_path / 'b'}"), opts, 2)
    assert (cp2["cp"], cp2["dp"], cp1["cp"], cp1["dp"]) == (2, 1, 1, 2)
    l2, l1 = [s["loss"] for s in cp2["steps"]], [s["loss"] for s in cp1["steps"]]
    assert len(l2) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(l1, l2, strict=True)), (l1, l2)
    assert abs(l2[0] - 5.545) < 0.1  # ~ln(256) at init
    assert {"loss", "lr", "grad_norm", "step_time_s", "tokens_per_s"} <= set(cp2["steps"][0])


def test_gpu_recipe_bf16_loss_decreases(tmp_path):
    recipe = _gpu_recipe_on_cpu(tmp_path, "train.steps=6", "train.lr=3e-3", "parallel.num_rings=1",
                                f"logging.output_dir={tmp_path / 'bf16'}")
    assert recipe.train.precision == "bf16"
    res = run_forked(recipe, RunOptions(log=False), 2)
    assert res["last_loss"] < res["first_loss"], [s["loss"] for s in res["steps"]]
