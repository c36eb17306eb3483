"""--context-parallel-backend / --tasp-* flags and their fail-closed validation (no Megatron needed)."""

from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

import pytest

from megatron_tasp import options as O
from megatron_tasp.megatron.args import (
    TASP_FLAGS,
    TaspArgumentError,
    add_tasp_args,
    option_type,
    tasp_options_from_args,
    validate_tasp_args,
)
from megatron_tasp.options import TaspOptions


@pytest.fixture(autouse=True)
def _no_tasp_environment(no_tasp_env):
    """These tests assume no MEGATRON_TASP_* option in the environment (the env tests set their own)."""


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
    with pytest.raises(TaspArgumentError, match=r"use keep_kv=False \(or 'auto'\) with 'symm'.*--tasp-transport"):
        validate_tasp_args(ns, device_capability=None)
    ok = SimpleNamespace(context_parallel_backend="tasp", tasp_transport="symm", tasp_keep_kv="auto")
    assert tasp_options_from_args(validate_tasp_args(ok, device_capability=None)).keep_kv == "auto"
    assert ok.tasp_options.transport == "symm"


def test_add_twice_is_harmless():
    p = _parser()
    assert add_tasp_args(p) is p


@pytest.mark.parametrize("bad", [["--context-parallel-backend", "ulysses"], ["--tasp-num-rings", "0"],
                                 ["--tasp-num-rings", "many"], ["--tasp-transport", "nccl"]])
def test_bad_flags_rejected(bad, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(bad)


def test_allgather_spelling_normalised(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_tasp"):
        a = _parser().parse_args(["--context-parallel-backend", "allgather"])
    assert a.context_parallel_backend == "all_gather"
    assert any("all_gather" in r.getMessage() and r.name == "megatron_tasp" for r in caplog.records)
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
    assert a.tasp_topology == str(topo) and a.tasp_options.topology == str(topo)
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


def test_hybrid_cp_rejected_for_tasp():
    """Packed (THD) batches are served, with --sft or inter-document masking (tests/test_megatron_thd.py);
    dynamic CP is not."""
    for extra in ({"hybrid_context_parallel": True},
                  {"hybrid_context_parallel": True, "dataloader_inter_document_masking": True,
                   "context_parallel_size": 2, "seq_length": 64}):
        ns = SimpleNamespace(context_parallel_backend="tasp", cp_comm_type=["p2p"], **extra)
        with pytest.raises(TaspArgumentError):
            validate_tasp_args(ns, device_capability=None)


def test_plain_namespace_without_megatron_fields():
    ns = SimpleNamespace(context_parallel_backend="tasp", tasp_num_rings="2", tasp_transport="auto")
    validate_tasp_args(ns, device_capability=None)
    assert ns.cp_comm_type == ["tasp"] and ns.tasp_num_rings == 2
    assert tasp_options_from_args(ns) == TaspOptions(num_rings=2) == ns.tasp_options
    bad = SimpleNamespace(context_parallel_backend="ulysses")
    with pytest.raises(TaspArgumentError):
        validate_tasp_args(bad, device_capability=None)


def test_num_rings_flag_type():
    parse = option_type("num_rings")
    assert parse("AUTO") == "auto" and parse("4") == 4 and parse(4) == 4
    for bad in (-1, "0", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="num_rings must be a positive integer or 'auto'"):
            parse(bad)


# ------------------------------------------------------------------------------------------------------------
# One parser: the flags, their values and args.tasp_options come from megatron_tasp.options.
# ------------------------------------------------------------------------------------------------------------


def test_every_user_facing_field_has_a_flag():
    fields = {field for field, _, _ in TASP_FLAGS.values()}
    assert fields == {"num_rings", "topology", "transport", "kernel", "chunks", "keep_kv", "keep_kv_cap_mib",
                      "dkv_dtype", "timeout_s", "cuda_graphs", "packed_dense_rows", "packed_kernel"}
    assert fields <= set(O.FIELDS)
    p = _parser()
    for flag in TASP_FLAGS:
        assert flag in p._option_string_actions, flag
    assert "--tasp-keep-kv-mib" in TASP_FLAGS and TASP_FLAGS["--tasp-keep-kv-mib"][0] == "keep_kv_cap_mib"
    assert TASP_FLAGS["--tasp-dkv-dtype"][0] == "dkv_dtype"


def test_flag_values_follow_the_options_rules():
    p = _parser()
    a = p.parse_args(["--tasp-keep-kv-mib", "32", "--tasp-dkv-dtype", "float32", "--tasp-timeout-s", "60",
                      "--tasp-kernel", "SDPA", "--tasp-transport", "P2P"])
    assert (a.tasp_keep_kv_mib, a.tasp_dkv_dtype, a.tasp_timeout_s, a.tasp_kernel, a.tasp_transport) == \
        (32.0, "fp32", 60.0, "sdpa", "p2p")
    assert p.parse_args(["--tasp-transport", "auto"]).tasp_transport == "auto"  # explicit auto is kept
    assert p.parse_args(["--tasp-cuda-graphs", "on"]).tasp_cuda_graphs is True
    assert p.parse_args(["--tasp-packed-dense-rows", "1024"]).tasp_packed_dense_rows == 1024
    off = p.parse_args(["--tasp-packed-dense-rows", "none"])
    assert off.tasp_packed_dense_rows == "none"  # kept as given, so that it wins over the environment
    assert tasp_options_from_args(off).packed_dense_rows is None
    assert tasp_options_from_args(p.parse_args(["--tasp-packed-kernel", "FLASH"])).packed_kernel == "flash"
    for bad in (["--tasp-keep-kv-mib", "0"], ["--tasp-dkv-dtype", "bf16"], ["--tasp-timeout-s", "-1"],
                ["--tasp-chunks", "1.5"], ["--tasp-packed-dense-rows", "0"], ["--tasp-packed-kernel", "fa3"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)


def test_validate_builds_tasp_options():
    a = _args(["--context-parallel-backend", "tasp", "--context-parallel-size", "4", "--seq-length", "64",
               "--tasp-num-rings", "2", "--tasp-transport", "p2p", "--tasp-chunks", "auto", "--tasp-keep-kv", "0",
               "--tasp-keep-kv-mib", "16", "--tasp-dkv-dtype", "input", "--tasp-kernel", "sdpa"])
    assert a.tasp_options == TaspOptions(num_rings=2, transport="p2p", chunks="auto", keep_kv=False,
                                         keep_kv_cap_mib=16, dkv_dtype="input", kernel="sdpa")
    # the args show the effective values
    assert (a.tasp_num_rings, a.tasp_chunks, a.tasp_keep_kv, a.tasp_keep_kv_mib) == (2, "auto", False, 16.0)
    assert validate_tasp_args(a, device_capability=None).tasp_options == a.tasp_options  # idempotent
    assert not hasattr(_args(["--context-parallel-backend", "p2p"]), "tasp_options")


def test_environment_below_flags(monkeypatch):
    cap_var = next(var for var, name in O.ENV_VARS.items() if name == "keep_kv_cap_mib")
    monkeypatch.setenv(cap_var, "8")
    monkeypatch.setenv("MEGATRON_TASP_TRANSPORT", "p2p")
    monkeypatch.setenv("MEGATRON_TASP_CHUNKS", "3")
    O.reload_env()
    a = _args(["--context-parallel-backend", "tasp", "--tasp-chunks", "2"])
    assert (a.tasp_options.keep_kv_cap_mib, a.tasp_options.transport, a.tasp_options.chunks) == (8.0, "p2p", 2)
    a = _args(["--context-parallel-backend", "tasp", "--tasp-transport", "auto"])  # explicit auto wins
    assert a.tasp_options.transport is None
    monkeypatch.setenv("MEGATRON_TASP_CHUNKS", "zero")
    O.reload_env()
    with pytest.raises(TaspArgumentError, match="MEGATRON_TASP_CHUNKS"):
        _args(["--context-parallel-backend", "tasp"])


def test_no_second_copy_of_the_value_rules():
    import megatron_tasp.megatron.args as A

    for gone in ("parse_chunks", "parse_keep_kv", "parse_num_rings", "TRANSPORTS"):
        assert not hasattr(A, gone), gone


def test_dataloader_mask_switched_off_for_tasp(caplog):
    argv = ["--context-parallel-backend", "tasp", "--context-parallel-size", "2"]
    ns = _parser().parse_args(argv)
    ns.create_attention_mask_in_dataloader = True
    with caplog.at_level(logging.INFO, logger="megatron_tasp"):
        validate_tasp_args(ns, device_capability=None)
    assert ns.create_attention_mask_in_dataloader is False
    assert any("create_attention_mask_in_dataloader" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)
    for other in (["--context-parallel-backend", "p2p"],  # other backends may need it
                  ["--context-parallel-backend", "tasp", "--cp-comm-type", "tasp", "p2p"]):  # TE layers too
        ns = _parser().parse_args(other)
        ns.create_attention_mask_in_dataloader = True
        validate_tasp_args(ns, device_capability=None)
        assert ns.create_attention_mask_in_dataloader is True


_BASE = dict(context_parallel_backend="tasp", context_parallel_size=2, seq_length=64, attention_dropout=0.0,
             cp_comm_type=["p2p"], tasp_num_rings="1", tasp_chunks="2")


@pytest.mark.parametrize("extra", [
    {"tensor_model_parallel_size": 2},
    {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    {"use_distributed_optimizer": True},
    {"num_experts": 4, "moe_router_topk": 2},
    {"num_experts": 4, "tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 2},
], ids=["tp2", "tp2_sp", "recompute_selective", "recompute_full_uniform", "recompute_full_block",
        "distributed_optimizer", "moe", "moe_tp2_sp_ep2"])
def test_parallelism_and_recompute_compose_with_tasp(extra):
    """TP, SP, activation recomputation, the distributed optimizer and MoE compose with TASP: validation
    passes, leaves the flags as they are and builds the right options."""
    ns = SimpleNamespace(**_BASE, **extra)
    validate_tasp_args(ns, device_capability=None)
    assert ns.tasp_enabled and ns.cp_comm_type == ["tasp"]
    assert ns.tasp_options == TaspOptions(num_rings=1, chunks=2)
    for key, value in extra.items():
        assert getattr(ns, key) == value, key
