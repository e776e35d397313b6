#!/usr/bin/env bash
# Sets up a virtual environment with the test extra (CPU wheels) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# PyTorch is for the tests only (transformers' LLaVA is the parity reference). Its CPU build comes from PyTorch's
# own index (PyPI's Linux wheels pull GBs of CUDA packages); where that index is unreachable, the configured ones.
python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 30 \
  || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
export JAX_PLATFORMS=cpu
python -m pytest tests -q -p no:cacheprovider "$@"
