"""``megatron-tasp simulate`` checks its arguments before printing anything: a bad one gives one error line."""

from __future__ import annotations

import pytest

from megatron_tasp.cli import main


@pytest.mark.parametrize("args,needle", [
    (["--topology", "nope"], "topology file 'nope' not found; shipped presets:"),
    (["--topology", "h100-sxm-8", "--topology", "nope"], "topology file 'nope' not found"),
    (["--calibration", "/nonexistent/cal.json"], "calibration file /nonexistent/cal.json not found"),
    (["--tokens", "1k,x"], "--tokens takes a comma list of integers"),
    (["--tokens", "0"], "--tokens must be positive integers"),
    (["--bench", "/nonexistent/bench.json"], "--bench /nonexistent/bench.json: no such file"),
    (["--interference", "nan"], "--interference must be a finite number"),
])
def test_bad_argument_is_one_line_before_any_output(capsys, args, needle):
    assert main(["simulate", *args]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-tasp simulate: error: ") and needle in lines[0], lines


def test_tokens_accept_k_suffix():
    from megatron_tasp.apps.simulate import _parse_tokens

    assert _parse_tokens("1k,2048,4K") == [1024, 2048, 4096]
