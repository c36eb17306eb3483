"""patches/: the Megatron-LM patch applies to the megatron/training shipped in the megatron-core wheel, and
its flags parse and validate through Megatron-LM's own parser; its GPT builder swaps TASP attention in."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

PATCH_DIR = Path(__file__).resolve().parents[1] / "patches"
PATCH = PATCH_DIR / "megatron-lm-core_v0.19.0-context-parallel-backend.patch"


def _training_dir() -> Path:
    if not H.has_megatron_training():
        pytest.skip("this megatron-core wheel has no megatron/training (needs >= 0.17)")
    import megatron.core

    return Path(megatron.core.__file__).resolve().parents[1] / "training"


@pytest.fixture(scope="module")
def patched_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    shutil.copytree(_training_dir(), root / "megatron" / "training",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if shutil.which("patch"):
        subprocess.run(["patch", "-s", "-p1", "-i", str(PATCH)], cwd=root, check=True)
    else:
        subprocess.run(["git", "apply", str(PATCH)], cwd=root, check=True)
    return root


def test_patch_files_exist():
    assert PATCH.is_file() and (PATCH_DIR / "README.md").is_file()
    text = PATCH.read_text()
    for path in ("megatron/training/arguments.py", "megatron/training/models/gpt.py",
                 "megatron/training/models/hybrid.py"):
        assert f"+++ b/{path}" in text


def test_patch_applies_cleanly_to_wheel(tmp_path):
    training = _training_dir()
    root = tmp_path / "copy"
    shutil.copytree(training, root / "megatron" / "training", ignore=shutil.ignore_patterns("__pycache__"))
    checked = False
    if shutil.which("git"):
        proc = subprocess.run(["git", "apply", "--check", "-v", str(PATCH)], cwd=root, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
        checked = True
    if shutil.which("patch"):
        proc = subprocess.run(["patch", "--dry-run", "-p1", "-i", str(PATCH)], cwd=root, capture_output=True,
                              text=True)
        assert proc.returncode == 0 and "FAILED" not in proc.stdout and "fuzz" not in proc.stdout.lower(), \
            proc.stdout + proc.stderr
        checked = True
    if not checked:
        pytest.skip("neither git nor patch is installed")


def test_patched_flags_parse_validate_and_build(patched_root):
    out = H.run_probe(f"patched_training_probe({str(patched_root)!r})")
    assert out["allgather"] == ["all_gather"] and out["cp_comm_allgather"] == ["all_gather"]
    assert out["tasp"] == [["tasp"], True, "auto", "p2p"]
    assert out["tasp_chunks_keep"] == [2, False]
    assert "attention-dropout 0.0" in out["dropout"]
    assert "attention-backend local" in out["local"]
    assert out["cp2_ring"] == ["p2p"] and out["cp2_tasp"] == ["tasp"] and out["cp2_a2a"] == ["a2a"]
    assert "hierarchical" in out["a2a+p2p"]
    assert out["config_cp_comm_type"] == "tasp"
    assert out["kinds"] == ["TaspDotProductAttention", "TaspDotProductAttention"]
