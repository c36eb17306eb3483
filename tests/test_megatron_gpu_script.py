"""scripts/gpu_train_gpt.py on CPU/gloo (--cpu-smoke): the same code path the 2x H100 run takes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

from megatron_tasp.launch import run_workers  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_train_gpt.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_train_gpt", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MOD = _load()


def _worker(rank, world, argv):
    return MOD.run(MOD.parse_args(argv))


def test_cp2_and_cp1_follow_the_same_trajectory(tmp_path):
    common = ["--cpu-smoke", "--dtype", "fp32", "--steps", "3", "--global-batch", "2", "--seq", "48"]
    cp2 = run_workers(_worker, 2, [*common, "--cp", "2", "--out", str(tmp_path / "cp2.json")])[0]
    cp1 = run_workers(_worker, 2, [*common, "--cp", "1", "--out", str(tmp_path / "cp1.json")])[0]
    assert (cp2["cp"], cp2["dp"], cp1["cp"], cp1["dp"]) == (2, 1, 1, 2)
    l2 = [s["loss"] for s in cp2["steps"]]
    l1 = [s["loss"] for s in cp1["steps"]]
    assert len(l2) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(l1, l2)), (l1, l2)
    assert abs(l2[0] - 5.545) < 0.1  # ~ln(256) at init
    saved = json.loads((tmp_path / "cp2.json").read_text())
    assert saved["steps"][0]["tokens_per_s"] > 0 and saved["num_params"] > 0
    assert {"loss", "lr", "grad_norm", "step_time_s", "tokens_per_s"} <= set(saved["steps"][0])


def test_bf16_loss_decreases(tmp_path):
    argv = ["--cpu-smoke", "--steps", "6", "--lr", "3e-3", "--cp", "2", "--num-rings", "1", "--out",
            str(tmp_path / "bf16.json")]
    res = run_workers(_worker, 2, argv)[0]
    assert res["last_loss"] < res["first_loss"], [s["loss"] for s in res["steps"]]


def test_torchrun_entry_point(tmp_path):
    out = tmp_path / "run.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--cpu-smoke", "--cp", "2", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and len(data["steps"]) == 2
