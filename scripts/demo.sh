#!/usr/bin/env bash
# The README's main job on the bundled default data: set up (idempotent), then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-$(nproc)}"
.venv/bin/qos-nets multipliers list
