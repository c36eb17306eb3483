"""Cost model on the 2x H200 record the shipped default calibration comes from.

Error thresholds are set from what the model achieves on docs/benchmarks/2026-11-30-h200x2-cp2.json (24 TASP
records, a2a, causal, GQA 32/8 and MHA 32/32, 1K..32K tokens/GPU, 16 of them with the KV kept for the
backward): median |err| 3.1 %, rms 6.6 %, max 17 % (4K, host-bound), max 6.4 % at >= 8K tokens/GPU;
compute-only median 4.2 %. The bounds leave a little room for refits, not for a different model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_tasp import costmodel as cm
from megatron_tasp.costmodel.fitting import cp2_topology_for, modelled
from megatron_tasp.topology import load_topology
from tests.test_costmodel import _numbers

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
BENCH = BENCHMARKS / "2026-11-30-h200x2-cp2.json"


@pytest.fixture(scope="module")
def records():
    return cm.load_records([BENCH])


@pytest.fixture(scope="module")
def calib(records):
    return cm.calibrate(records)


def test_shipped_default_matches_fresh_calibration(calib):
    fresh = dict(_numbers(calib.to_dict()))
    for name, v in _numbers(cm.DEFAULT_CALIBRATION_DICT):
        assert v == pytest.approx(fresh[name], rel=2e-3, abs=1e-6), name
    d = cm.default_calibration()
    assert (d.calibration_topology, d.machine, d.source) == ("h200-nv18-2", "NVIDIA H200", BENCH.name)


def test_h200_calibration_is_plausible(records, calib):
    params = {k: v for k, v in calib.to_dict().items() if k != "fit"}
    for name, v in _numbers(params):
        assert math.isfinite(v) and v >= 0, (name, v)
    # H200 SXM: the H100's 989 TFLOP/s dense bf16 tensor cores, cuDNN reaches ~60 % of it on long blocks
    assert 500 < calib.fwd.peak_tflops < 750 and 450 < calib.bwd.peak_tflops < calib.fwd.peak_tflops
    assert 0 < calib.fwd.half_gflop < calib.bwd.half_gflop < 300
    assert 1000 < calib.mem_GBps < 4800  # below the H200's 4.8 TB/s HBM3e
    assert 0.5 < calib.host_fwd_ms < calib.host_bwd_ms < 3 and 0 < calib.host_exchange_a2a_ms < 0.5
    assert 0 < calib.alpha_a2a_us < calib.alpha_p2p_us < 200 and 0 < calib.msg_overhead_us < 200
    assert 0.5 < calib.interference <= 1
    # the fitted one-peer bandwidth is what the sweep measured with its largest all_to_all_single
    peer = load_topology("h200-nv18-2").intra_node.peer_GBps
    a2a = max((r for r in records if r.kind == "transport" and r.impl == "a2a_single"), key=lambda r: r.bytes)
    assert a2a.bytes == 256 << 20 and 240 < a2a.GBps_per_direction < 290
    assert calib.link_efficiency * peer == pytest.approx(a2a.GBps_per_direction, rel=0.05)
    assert calib.fit["transport"]["records"] == 40 and calib.fit["transport"]["rms_rel_err"] < 0.15
    k = calib.fit["kernels"]
    assert k["fwd_records"] == k["bwd_records"] == 12
    assert k["fwd_rms_rel_err"] < 0.06 and k["bwd_rms_rel_err"] < 0.10


def test_error_against_every_h200_tasp_record(records, calib):
    tasp = [r for r in records if r.impl == "tasp" and modelled(r)]
    assert len(tasp) == 24 and all(r.transport == "a2a" and r.causal for r in tasp)
    assert sum(bool(r.keep_kv) for r in tasp) == 16
    rep = cm.error_report(records, calib)
    assert len([r for r in rep.rows if r["impl"] == "tasp"]) == 24
    assert all(math.isfinite(r["rel_err"]) for r in rep.rows)
    s = rep.summary["tasp"]
    assert s["median_abs_rel_err"] < 0.04
    assert s["rms_rel_err"] < 0.08
    assert s["max_abs_rel_err"] < 0.20
    assert abs(s["mean_signed_rel_err"]) < 0.03  # no systematic bias
    assert rep.summary["tasp/tokens>=8K"]["max_abs_rel_err"] < 0.08
    assert rep.summary["tasp/kept KV"]["records"] == 16 and rep.summary["tasp/KV sent again"]["records"] == 8
    assert rep.summary["compute_only"]["median_abs_rel_err"] < 0.05
    assert rep.summary["compute_only/tokens>=8K"]["max_abs_rel_err"] < 0.12


def test_model_tracks_tasp_cost_over_compute_only(records, calib):
    """At >= 8K tokens/GPU the predicted TASP / compute-only time ratio (what the exchange costs beyond the
    kernels) follows the measured one, and MHA (KV sent again, 4x the bytes) costs more than GQA."""
    rep = cm.error_report(records, calib)
    key = lambda r: (r["tokens_per_gpu"], r["heads_kv"], r["pass"])  # noqa: E731
    co = {key(r): r for r in rep.rows if r["impl"] == "compute_only"}
    ratio = {}
    for r in rep.rows:
        if r["impl"] == "tasp" and r["tokens_per_gpu"] >= 8192:
            c = co[key(r)]
            ratio[key(r)] = (r["measured_ms"] / c["measured_ms"], r["predicted_ms"] / c["predicted_ms"])
    assert len(ratio) == 12
    for k, (measured, predicted) in ratio.items():
        assert predicted == pytest.approx(measured, abs=0.06), k
    for t in (8192, 16384):
        for passes in ("fwd", "fwd_bwd"):
            assert ratio[(t, 32, passes)][1] > ratio[(t, 8, passes)][1]


def test_calibration_topology_follows_the_records_device(records):
    assert cp2_topology_for(["NVIDIA H200"]) == "h200-nv18-2"
    assert cp2_topology_for(["NVIDIA GH200 480GB"]) == cp2_topology_for(["NVIDIA H200 NVL"]) == "h100-nv18-2"
    assert cp2_topology_for(["NVIDIA H100 80GB HBM3", ""]) == "h100-nv18-2"
    assert cp2_topology_for([]) == "h100-nv18-2"  # no device named: the former default
    with pytest.raises(cm.CostModelError, match="more than one machine"):
        cp2_topology_for(["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
    v4 = cm.load_records([BENCHMARKS / "2026-11-25-h100x2-cp2-v4.json"])
    with pytest.raises(cm.CostModelError, match="calib-topology"):
        cm.calibrate(list(records) + list(v4))
    transport = [r for r in records if r.kind == "transport"]
    assert cm.calibrate(transport).calibration_topology == "h200-nv18-2"
    named = cm.calibrate(transport, topology="h100-nv18-2")  # an explicit machine wins over the device name
    assert named.calibration_topology == "h100-nv18-2"
    h200, h100 = load_topology("h200-nv18-2"), load_topology("h100-nv18-2")
    assert (h200.world_size, h200.intra_node.peer_GBps) == (2, h100.intra_node.peer_GBps)


def test_auto_choices_on_the_two_gpu_nodes_stay_as_measured(no_tasp_env):
    """With the shipped (H200) calibration, CP=2 on either 2-GPU preset keeps one chunk and a2a for every
    benchmarked shape: chunked lanes never paid on 2x H100, and the H200 runs used a2a."""
    from megatron_tasp import tuning

    tuning.clear_caches()
    for name in ("h100-nv18-2", "h200-nv18-2"):
        topo = load_topology(name)
        for t in (1024, 4096, 8192, 32768, 65536):
            for hkv in (32, 8):
                for causal in (True, False):
                    hint = {"tokens_per_gpu": t, "heads_q": 32, "heads_kv": hkv, "head_dim": 128, "causal": causal}
                    assert tuning.choose_num_rings(topo, hint) == 1
                    assert tuning.choose_chunks(topo, hint, 1) == 1, (name, hint)
                    assert tuning.choose_transport(topo, hint, 1) == "a2a", (name, hint)
