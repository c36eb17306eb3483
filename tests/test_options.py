"""TaspOptions.packed_dense_rows: its values, the environment variable, the Megatron path (which takes the
environment), ``to_dict`` and the compiled call's digest. That it reaches the varlen blocks and gives a call of
its own: tests/test_thd_varlen.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_tasp import options as O
from megatron_tasp.engine.agree import options_digest
from megatron_tasp.megatron.args import tasp_options_from_args
from megatron_tasp.options import TaspOptionError, TaspOptions, parse_options


def test_packed_dense_rows_values():
    assert TaspOptions().packed_dense_rows is None  # every segment in the varlen launch
    for given, want in ((1024, 1024), ("512", 512), (" 64 ", 64), (None, None), ("None", None), ("off", None)):
        assert TaspOptions(packed_dense_rows=given).packed_dense_rows == want, given
    for bad in (0, -3, "0", "1.5", 2.0, True, "many", [8]):
        with pytest.raises(TaspOptionError, match="packed_dense_rows must be a positive integer or None"):
            TaspOptions(packed_dense_rows=bad)
    assert parse_options({"tasp_packed_dense_rows": "256"}, use_env=False).packed_dense_rows == 256
    assert TaspOptions(packed_dense_rows=8).to_dict()["packed_dense_rows"] == 8
    assert TaspOptions(packed_dense_rows=8) != TaspOptions()


def test_packed_dense_rows_from_the_environment(no_tasp_env, monkeypatch):
    assert O.ENV_VARS["MEGATRON_TASP_PACKED_DENSE_ROWS"] == "packed_dense_rows"
    monkeypatch.setenv("MEGATRON_TASP_PACKED_DENSE_ROWS", "1024")
    O.reload_env()
    assert O.default_options().packed_dense_rows == 1024
    assert tasp_options_from_args(SimpleNamespace()).packed_dense_rows == 1024  # Megatron: env < flags
    assert parse_options({"packed_dense_rows": 64}).packed_dense_rows == 64  # the caller wins
    assert parse_options({"packed_dense_rows": None}).packed_dense_rows == 1024  # None: not given
    assert parse_options({"packed_dense_rows": "none"}).packed_dense_rows is None  # switched off explicitly
    monkeypatch.setenv("MEGATRON_TASP_PACKED_DENSE_ROWS", "lots")
    O.reload_env()
    with pytest.raises(TaspOptionError, match="packed_dense_rows .* MEGATRON_TASP_PACKED_DENSE_ROWS"):
        O.default_options()


def test_packed_dense_rows_is_part_of_the_call_digest():
    """The cross-rank agreement compares this digest: another threshold is another compiled call."""
    base = TaspOptions()
    assert options_digest(base, 0.125, False) != options_digest(base.replace(packed_dense_rows=1024), 0.125, False)
    assert options_digest(TaspOptions(packed_dense_rows="1024"), 0.125, False) == \
        options_digest(base.replace(packed_dense_rows=1024), 0.125, False)


def test_packed_kernel_values_environment_and_digest(no_tasp_env, monkeypatch):
    assert TaspOptions().packed_kernel == "auto"
    for given, want in (("cudnn", "cudnn"), (" FLASH ", "flash"), ("Auto", "auto")):
        assert TaspOptions(packed_kernel=given).packed_kernel == want
    for bad in ("fa3", "", None, 1):
        with pytest.raises(TaspOptionError, match="packed_kernel must be 'auto', 'cudnn' or 'flash'"):
            TaspOptions(packed_kernel=bad)
    assert O.ENV_VARS["MEGATRON_TASP_PACKED_KERNEL"] == "packed_kernel"
    monkeypatch.setenv("MEGATRON_TASP_PACKED_KERNEL", "flash")
    O.reload_env()
    assert O.default_options().packed_kernel == "flash"
    assert parse_options({"packed_kernel": "cudnn"}).packed_kernel == "cudnn"  # the caller wins
    base = TaspOptions()
    assert options_digest(base, 0.125, False) != options_digest(base.replace(packed_kernel="flash"), 0.125, False)
