"""Every user error of ``megatron-tasp plan`` / ``verify`` is one line on stderr with exit code 2."""

from __future__ import annotations

import pytest

from megatron_tasp.cli import main
from megatron_tasp.topology import MAX_WORLD_SIZE


@pytest.mark.parametrize("argv,expect", [
    (["plan", "-n", "8", "--rank", "9", "--json"], "--rank must be in 0..7"),
    (["plan", "-n", "8", "--rank", "-1"], "--rank must be in 0..7"),
    (["plan", "-n", "2000"], f"at most {MAX_WORLD_SIZE}"),
    (["plan", "-n", "100000"], f"at most {MAX_WORLD_SIZE}"),
    (["plan", "-n", "8", "-k", "9"], "at most 7 orthogonal rings"),
    (["verify", "--max-n", "-5"], f"--max-n must be in 2..{MAX_WORLD_SIZE}"),
    (["verify", "--max-n", "100000"], f"--max-n must be in 2..{MAX_WORLD_SIZE}"),
])
def test_plan_and_verify_errors_are_one_line(argv, expect, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1 and "Traceback" not in err


def test_topology_directory_and_bad_encoding_name_the_file(tmp_path, capsys):
    assert main(["plan", "--topology", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and str(tmp_path) in err and err.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: x\n\xff\xfe: 1\n")
    assert main(["plan", "--topology", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "UTF-8" in err and err.count("\n") == 1


def test_verify_small_bound_succeeds(capsys):
    assert main(["verify", "--max-n", "9", "--quiet"]) == 0
    assert "verified n = 2..9" in capsys.readouterr().out
