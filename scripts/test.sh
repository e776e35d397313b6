#!/usr/bin/env bash
# Sets up a virtual environment with the test extra (CPU wheels) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"   # the CPU wheel; a plain `torch` would pull CUDA packages
python -m pip install -q -e ".[test]"
export JAX_PLATFORMS=cpu
python -m pytest tests -q -p no:cacheprovider "$@"
