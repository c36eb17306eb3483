"""The unpatched routes into Megatron-LM: ``--spec megatron_tasp.megatron.spec <fn>`` and the launcher
``python -m megatron_tasp.megatron.pretrain_gpt`` (run against a stand-in pretrain_gpt.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron


def _need_training():
    if not H.has_megatron_training():
        pytest.skip("this megatron-core wheel has no megatron/training (needs >= 0.17)")


def test_missing_checkout_is_a_clear_error(tmp_path, monkeypatch):
    from megatron_tasp.megatron import pretrain_gpt as launcher

    monkeypatch.setenv("MEGATRON_LM_PATH", str(tmp_path))
    with pytest.raises(launcher.MegatronLMNotFound, match="no pretrain_gpt.py"):
        launcher.import_pretrain_gpt()
    monkeypatch.delenv("MEGATRON_LM_PATH")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p])
    if __import__("importlib").util.find_spec("pretrain_gpt") is None:
        with pytest.raises(launcher.MegatronLMNotFound, match="MEGATRON_LM_PATH"):
            launcher.import_pretrain_gpt()


def test_module_entry_point_reports_missing_checkout(tmp_path):
    env = {"MEGATRON_LM_PATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os

    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-m", "megatron_tasp.megatron.pretrain_gpt"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "pretrain_gpt.py" in proc.stderr


@pytest.mark.parametrize("spec_fn", ["gpt_tasp_spec", "gpt_tasp_local_spec"])
def test_spec_flag_without_patch(spec_fn):
    _need_training()
    assert H.run_probe(f"spec_flag_probe({spec_fn!r})")["kinds"] == ["TaspDotProductAttention"] * 2


def test_launcher_selects_tasp(tmp_path):
    _need_training()
    (tmp_path / "pretrain_gpt.py").write_text(H.FAKE_PRETRAIN_GPT)
    extra = ["--context-parallel-backend", "tasp", "--attention-dropout", "0.0", "--tasp-transport", "a2a",
             "--spec", "megatron_tasp.megatron.spec", "gpt_tasp_local_spec"]
    out = H.run_probe(f"launcher_probe({str(tmp_path)!r}, {extra!r})")
    assert out["cp_comm_type"] == ["tasp"] and out["tasp_enabled"] is True
    assert out["positional"][0] == "train_valid_test_datasets_provider" and out["positional"][2] == "forward_step"
    assert out["kwargs"] == ["get_embedding_ranks", "store"]
    assert out["kinds"] == ["TaspDotProductAttention"] * 2 and out["transport"] == ["a2a", "a2a"]
    assert out["config_tasp_attrs"] == [] and out["mask_in_dataloader"] is False
