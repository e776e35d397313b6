#!/usr/bin/env bash
# Sets up a virtual environment and runs the main job on its bundled default: vanilla LLaVA, Blink-interp
# and Blink on the demo model's synthetic POPE benchmark, printed side by side. Extra arguments go to eval.run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -e .
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python -m eval.run --bench pope "$@"
