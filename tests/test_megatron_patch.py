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
    assert out["tasp_options"]["num_rings"] == "auto" and out["tasp_options"]["transport"] == "p2p"
    assert out["tasp_options"]["chunks"] == 2 and out["tasp_options"]["keep_kv"] is False
    assert out["tasp_mask_in_dataloader"] is False  # TASP never reads the S x S mask
    assert out["bad_keep_kv"] == "SystemExit 2"  # the options module's rules, through the patched parser
    assert out["config_cp_comm_type"] == "tasp" and out["config_tasp_attrs"] == []
    assert out["kinds"] == ["TaspDotProductAttention", "TaspDotProductAttention"]
    assert out["built_options"] == [[1, "p2p"], [1, "p2p"]]  # the flags reached every layer's core attention


def test_patch_defines_no_flag_parser_of_its_own():
    added = "\n".join(line for line in PATCH.read_text().splitlines() if line.startswith("+"))
    assert "add_tasp_args" in added and "--tasp-" not in added.replace("--tasp-* flags", "")


def test_tasp_composes_with_parallelism_in_megatron_validation(patched_root):
    """Megatron-LM's own validate_args with --context-parallel-backend tasp plus TP, SP, recompute, the
    distributed optimizer and MoE: accepted, the flags kept, the options right."""
    out = H.run_probe(f"tasp_combinations_probe({str(patched_root)!r})", timeout=300)
    assert set(out) == set(H.COMBO_ARGV)
    for name, got in out.items():
        assert got["result"] == "accepted", (name, got)
        assert got["cp"] == 2 and got["cp_comm_type"] == ["tasp"], (name, got)
        assert got["options"]["num_rings"] == 1 and got["options"]["chunks"] == 2, (name, got)
    assert out["tp2"]["tp"] == 2 and out["tp2_sp"]["sequence_parallel"] is True
    assert out["recompute_selective"]["recompute"] == ["selective", None]
    assert out["recompute_full"]["recompute"] == ["full", "uniform"]
    assert out["distributed_optimizer"]["distributed_optimizer"] is True
    assert out["moe"]["num_experts"] == 4 and out["moe_tp2_sp"]["sequence_parallel"] is True
