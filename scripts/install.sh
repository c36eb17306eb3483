#!/usr/bin/env bash
# Create .venv with everything megatron-tasp needs on a CPU machine (Python 3.11+):
#   torch 2.13.0 (CPU build, installed FIRST so pip never resolves a multi-GB CUDA build),
#   this package with its test/plot/progress extras, and megatron-core 0.19.2.
# megatron-core >= 0.17 declares Python >= 3.12 but megatron.core works on 3.11; its runtime deps
# (torch, numpy, packaging) are installed first, so --no-deps is safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0 numpy 'packaging>=24.2'
"$VENV/bin/python" -m pip install -q -e '.[test]'
"$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
echo "installed into $VENV"
