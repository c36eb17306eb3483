"""The README's Python snippets run as written (in a fresh interpreter, so import order matters as it does
for a user)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _section_code(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under '### {title}'"
    return blocks[0]


def test_megatron_core_snippet_runs_as_written():
    code = _section_code("Megatron-Core") + (
        "\nfrom megatron_tasp.megatron.spec import count_tasp_layers, tasp_options_of\n"
        "assert count_tasp_layers(spec) == 1 and [o.num_rings for o in tasp_options_of(spec)] == ['auto']\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_attention_snippet_names_exist():
    code = _section_code("The attention function").splitlines()[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
