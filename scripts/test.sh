#!/usr/bin/env bash
# Sets up a virtual environment with the test extra (CPU wheels) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# PyTorch is for the tests only (transformers' LLaVA is the parity reference). Its CPU build comes from PyTorch's
# own index (PyPI's Linux wheels pull GBs of CUDA packages) when that index answers within seconds; otherwise
# from pip's configured indexes (offline mirrors carry the CPU wheel).
torch_index=()
if timeout 10 python -c 'import socket; socket.setdefaulttimeout(3); socket.create_connection(("download.pytorch.org", 443)).close()' \
    2>/dev/null; then
  torch_index=(--index-url https://download.pytorch.org/whl/cpu)
fi
python -m pip install -q "torch==2.13.0" ${torch_index[@]+"${torch_index[@]}"}
python -m pip install -q -e ".[test]"
# lmms-eval (the version of the `lmms` extra) for the plugin test, without its heavy dependency list: the test
# extra holds what its evaluator and POPE task import.
python -m pip install -q --no-deps "$(grep -o 'lmms-eval==[0-9.]*' pyproject.toml)"
export JAX_PLATFORMS=cpu
# Two workers, a test file each at a time (files share module fixtures); `-n 0` in the arguments runs in one process.
python -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile "$@"
