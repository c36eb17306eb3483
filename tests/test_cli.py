"""The megatron-tasp command line: plan/verify/report output and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tasp.topology import verify_rings

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_tasp.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.parametrize("n,k", [(10, 9), (4, 2), (6, 4), (8, 7), (2, 1), (7, 6)])
def test_plan_json_gives_verified_maximal_rings(n, k):
    res = cli("plan", "--world-size", str(n), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["world_size"] == n and doc["num_rings"] == k and len(doc["rings"]) == k
    verify_rings(n, doc["rings"])


def test_plan_table_draw_and_rank(tmp_path):
    png = tmp_path / "rings.png"
    res = cli("plan", "--topology", "h100-sxm-8x2", "--rank", "3", "--draw", str(png))
    assert res.returncode == 0, res.stderr
    assert "8 orthogonal directed Hamiltonian ring(s)" in res.stdout
    assert "schedule of rank 3" in res.stdout and "(2 inter-node hops)" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = cli("plan", "-n", "5", "-k", "2", "--json", "--rank", "1")
    assert len(json.loads(res.stdout)["schedule"]) == 5


@pytest.mark.parametrize("args,needle", [
    (("plan", "--world-size", "1"), "--world-size must be >= 2"),
    (("plan", "--world-size", "4", "--num-rings", "3"), "at most 2 orthogonal rings"),
    (("plan", "--world-size", "4", "--topology", "mi300x-8"), "describes 8 GPUs"),
    (("plan", "--topology", "no-such-machine"), "not found"),
    (("plan",), "give --world-size N or --topology FILE"),
])
def test_bad_input_is_one_line_without_traceback(args, needle):
    res = cli(*args)
    assert res.returncode == 2
    assert needle in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngpus_per_node: [8\n")
    res = cli("plan", "--topology", str(bad))
    assert res.returncode == 2 and "malformed YAML" in res.stderr and "Traceback" not in res.stderr


def test_verify_command():
    res = cli("verify", "--max-n", "16", "--quiet")
    assert res.returncode == 0 and "verified n = 2..16" in res.stdout


def test_report_generates_table_and_plot(tmp_path):
    bench = sorted((REPO / "docs" / "benchmarks").glob("*-cp2-v2.json"))[-1]
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\ny\n")
    res = cli("report", str(bench), "--plot", str(tmp_path / "p.png"), "--readme", str(readme))
    assert res.returncode == 0, res.stderr
    text = readme.read_text()
    assert "old" not in text and "| 2 | 8192 | 32/8 | causal | fwd_bwd |" in text


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "b.json"
    res = cli("bench", "--device", "cpu", "--world-size", "3", "--tokens", "24", "--heads", "4/2", "--head-dim",
              "8", "--mask", "causal", "--passes", "fwd_bwd", "--impls", "tasp,compute_only,kernel_bound", "--dtype",
              "float32", "--iters", "1", "--warmup", "0", "--chunks", "1,2,auto", "--min-total-ms", "5", "--out",
              str(out))
    assert res.returncode == 0, res.stderr
    recs = json.loads(out.read_text())
    tasp = [r for r in recs if r["impl"] == "tasp"]
    assert {r["num_rings"] for r in tasp} == {1, 2} and all(r["max_rel_err"] < 1e-5 for r in tasp)
    assert {r["chunks"] for r in tasp} == {1, 2}  # 'auto' is recorded as what it resolved to
    assert {r["requested"]["chunks"] for r in tasp} == {1, 2, "auto"}
    assert all(r["format"] == 2 and r["dkv_dtype"] in ("fp32", "input") and r["keep_kv"] in (True, False)
               for r in tasp)
    bound = [r for r in recs if r["impl"] == "kernel_bound"]
    assert len(bound) == 1 and bound[0]["time_ms"] > 0 and bound[0]["kernel"] == "cpu"
    res = cli("report", str(out))
    assert res.returncode == 0, res.stderr
    assert "| 3 | 24 | 4/2 | causal | fwd_bwd |" in res.stdout and "vs kernels" in res.stdout


@pytest.mark.parametrize("flag,value,needle", [
    ("--num-rings", "0", "num_rings"), ("--transports", "pigeon", "transport"),
    ("--chunks", "x", "chunks"), ("--keep-kv", "maybe", "keep_kv")])
def test_bench_flags_are_validated_by_the_options_parser(flag, value, needle):
    res = cli("bench", "--device", "cpu", flag, value)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bench_help():
    res = cli("bench", "--help")
    assert res.returncode == 0 and "kernel_bound" in res.stdout
