#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-$(nproc)}"
exec .venv/bin/python -m pytest -q "$@"
