"""scripts/hf_finetune_check.py end to end on CPU at a tiny size: an HF directory in, a TASP fine-tune at CP=2 on
packed documents, an HF directory out, and transformers' recomputed held-out losses equal Megatron's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import megatron_helpers as H

H.require_megatron()
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("psutil", reason="megatron.core.dist_checkpointing needs psutil to save checkpoints")
if H.megatron_version().startswith("0.16."):
    pytest.skip("megatron-core 0.16's checkpoint writer starts worker processes, which forked ranks (daemons) cannot",
                allow_module_level=True)
pytestmark = pytest.mark.megatron

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "hf_finetune_check.py"


def test_hf_in_finetune_hf_out_losses_match(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--seq", "256", "--steps", "2",
           "--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--max-bytes", "200000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((tmp_path / "hf-finetune-check.json").read_text())
    assert rec["ok"] and rec["start_matches"] and rec["export_matches"]
    assert abs(rec["hf_original_eval"] - rec["megatron_first_eval"]) <= 1e-4 * rec["megatron_first_eval"]
    assert (tmp_path / "exported" / "config.json").is_file()
