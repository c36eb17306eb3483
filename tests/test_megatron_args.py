"""--context-parallel-backend / --tasp-* flags and their fail-closed validation (no Megatron needed)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from megatron_tasp.megatron.args import (
    TaspArgumentError,
    add_tasp_args,
    parse_num_rings,
    tasp_options_from_args,
    validate_tasp_args,
)


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--cp-comm-type", nargs="+", default=["p2p"])
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--attention-dropout", type=float, default=0.0)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None)
    return add_tasp_args(p)


def _args(argv, **kw):
    return validate_tasp_args(_parser().parse_args(argv), device_capability=kw.pop("cap", None))


def test_flags_parse():
    a = _parser().parse_args(["--context-parallel-backend", "tasp", "--tasp-num-rings", "3", "--tasp-transport",
                              "p2p", "--tasp-topology", "h100-sxm-8", "--tasp-kernel", "sdpa"])
    assert (a.context_parallel_backend, a.tasp_num_rings, a.tasp_transport, a.tasp_topology, a.tasp_kernel) == \
        ("tasp", 3, "p2p", "h100-sxm-8", "sdpa")
    assert _parser().parse_args(["--tasp-num-rings", "auto"]).tasp_num_rings == "auto"
    a = _parser().parse_args([])
    assert a.context_parallel_backend is None and a.tasp_num_rings is None and a.tasp_chunks is None
    a = _parser().parse_args(["--tasp-chunks", "2", "--tasp-transport", "symm"])
    assert (a.tasp_chunks, a.tasp_transport) == (2, "symm")
    assert _parser().parse_args(["--tasp-chunks", "auto"]).tasp_chunks == "auto"
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["--tasp-chunks", bad])
    assert _parser().parse_args([]).tasp_keep_kv is None
    assert [_parser().parse_args(["--tasp-keep-kv", v]).tasp_keep_kv for v in ("auto", "1", "off")] == \
        ["auto", True, False]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--tasp-keep-kv", "sometimes"])


def test_keep_kv_with_symm_fails_closed():
    ns = SimpleNamespace(context_parallel_backend="tasp", tasp_transport="symm", tasp_keep_kv="1")
    with pytest.raises(TaspArgumentError, match="--tasp-keep-kv auto or 0"):
        validate_tasp_args(ns, device_capability=None)
    ok = SimpleNamespace(context_parallel_backend="tasp", tasp_transport="symm", tasp_keep_kv="auto")
    assert tasp_options_from_args(validate_tasp_args(ok, device_capability=None))["tasp_keep_kv"] == "auto"


def test_add_twice_is_harmless():
    p = _parser()
    assert add_tasp_args(p) is p


@pytest.mark.parametrize("bad", [["--context-parallel-backend", "ulysses"], ["--tasp-num-rings", "0"],
                                 ["--tasp-num-rings", "many"], ["--tasp-transport", "nccl"]])
def test_bad_flags_rejected(bad, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(bad)


def test_allgather_spelling_normalised(capsys):
    a = _parser().parse_args(["--context-parallel-backend", "allgather"])
    assert a.context_parallel_backend == "all_gather"
    assert "all_gather" in capsys.readouterr().err
    assert _args(["--context-parallel-backend", "allgather"]).cp_comm_type == ["all_gather"]
    assert _args(["--cp-comm-type", "allgather"]).cp_comm_type == ["all_gather"]


@pytest.mark.parametrize("backend,comm", [("ring", "p2p"), ("p2p", "p2p"), ("a2a", "a2a"),
                                          ("all_gather", "all_gather"), ("tasp", "tasp")])
def test_backend_sets_cp_comm_type(backend, comm):
    a = _args(["--context-parallel-backend", backend, "--context-parallel-size", "2"])
    assert a.cp_comm_type == [comm]
    assert a.tasp_enabled is (comm == "tasp")


def test_default_keeps_cp_comm_type():
    a = _args(["--cp-comm-type", "a2a"])
    assert a.cp_comm_type == ["a2a"] and a.tasp_enabled is False
    assert _args(["--cp-comm-type", "tasp"]).tasp_enabled is True


def test_mixed_per_layer_list():
    a = _args(["--context-parallel-backend", "tasp", "--cp-comm-type", "tasp", "p2p", "--context-parallel-size", "2"])
    assert a.cp_comm_type == ["tasp", "p2p"] and a.tasp_enabled
    with pytest.raises(TaspArgumentError, match="conflicts"):
        _args(["--context-parallel-backend", "a2a", "--cp-comm-type", "tasp", "p2p"])
    with pytest.raises(TaspArgumentError, match="conflicts"):
        _args(["--context-parallel-backend", "tasp", "--cp-comm-type", "a2a", "p2p"])


def test_local_attention_backend_rejected():
    with pytest.raises(TaspArgumentError, match="attention-backend local"):
        _args(["--context-parallel-backend", "tasp", "--attention-backend", "local"])
    enum_like = SimpleNamespace(name="local")
    ns = SimpleNamespace(context_parallel_backend="tasp", cp_comm_type=["p2p"], attention_backend=enum_like)
    with pytest.raises(TaspArgumentError, match="attention-backend local"):
        validate_tasp_args(ns, device_capability=None)
    # other backends may use local attention
    assert _args(["--context-parallel-backend", "p2p", "--attention-backend", "local"]).cp_comm_type == ["p2p"]


def test_attention_dropout_rejected_for_tasp():
    with pytest.raises(TaspArgumentError, match="attention-dropout 0.0"):
        _args(["--context-parallel-backend", "tasp", "--attention-dropout", "0.1"])


def test_seq_length_divisibility():
    with pytest.raises(TaspArgumentError, match="multiple of 2"):
        _args(["--context-parallel-size", "4", "--seq-length", "100", "--context-parallel-backend", "tasp"])
    with pytest.raises(TaspArgumentError, match="multiple of 2"):
        _args(["--context-parallel-size", "3", "--seq-length", "64"])
    _args(["--context-parallel-size", "4", "--seq-length", "96", "--context-parallel-backend", "tasp"])


def test_topology_world_size_must_match(tmp_path):
    topo = tmp_path / "four.yaml"
    topo.write_text("name: four\ngpus_per_node: 4\n")
    a = _args(["--context-parallel-backend", "tasp", "--context-parallel-size", "4", "--tasp-topology", str(topo)])
    assert a.tasp_topology == str(topo)
    with pytest.raises(TaspArgumentError, match="describes 4 GPUs"):
        _args(["--context-parallel-backend", "tasp", "--context-parallel-size", "2", "--tasp-topology", str(topo)])


def test_num_rings_bounded_by_available_rings():
    _args(["--context-parallel-backend", "tasp", "--context-parallel-size", "4", "--tasp-num-rings", "2"])
    with pytest.raises(TaspArgumentError, match="exceeds"):
        _args(["--context-parallel-backend", "tasp", "--context-parallel-size", "4", "--tasp-num-rings", "3"])


def test_cuda_device_max_connections_on_hopper(monkeypatch):
    argv = ["--context-parallel-backend", "tasp", "--context-parallel-size", "2"]
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    with pytest.raises(TaspArgumentError, match="CUDA_DEVICE_MAX_CONNECTIONS=1"):
        _args(argv, cap=(9, 0))
    _args(argv, cap=(10, 0))  # Blackwell: not needed
    _args(argv, cap=None)  # no GPU
    _args(["--context-parallel-backend", "tasp"], cap=(9, 0))  # CP 1
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _args(argv, cap=(9, 0))


def test_a2a_p2p_needs_hierarchical_sizes():
    with pytest.raises(TaspArgumentError, match="silently"):
        _args(["--context-parallel-backend", "a2a+p2p", "--context-parallel-size", "4"])
    with pytest.raises(TaspArgumentError, match="multiply"):
        _args(["--cp-comm-type", "a2a+p2p", "--context-parallel-size", "4",
               "--hierarchical-context-parallel-sizes", "2", "3"])
    a = _args(["--context-parallel-backend", "a2a+p2p", "--context-parallel-size", "4",
               "--hierarchical-context-parallel-sizes", "2", "2"])
    assert a.cp_comm_type == ["a2a+p2p"]


def test_packed_and_hybrid_cp_rejected_for_tasp():
    for extra in ({"sft": True}, {"dataloader_inter_document_masking": True}, {"hybrid_context_parallel": True}):
        ns = SimpleNamespace(context_parallel_backend="tasp", cp_comm_type=["p2p"], **extra)
        with pytest.raises(TaspArgumentError):
            validate_tasp_args(ns, device_capability=None)


def test_plain_namespace_without_megatron_fields():
    ns = SimpleNamespace(context_parallel_backend="tasp", tasp_num_rings="2", tasp_transport="auto")
    validate_tasp_args(ns, device_capability=None)
    assert ns.cp_comm_type == ["tasp"] and ns.tasp_num_rings == 2
    assert tasp_options_from_args(ns) == {"tasp_num_rings": 2, "tasp_topology": None, "tasp_transport": None,
                                          "tasp_kernel": None, "tasp_chunks": None, "tasp_keep_kv": None}
    bad = SimpleNamespace(context_parallel_backend="ulysses")
    with pytest.raises(TaspArgumentError):
        validate_tasp_args(bad, device_capability=None)


def test_parse_num_rings():
    assert parse_num_rings(None) is None and parse_num_rings("AUTO") == "auto" and parse_num_rings(4) == 4
    with pytest.raises(argparse.ArgumentTypeError):
        parse_num_rings(-1)
