#!/usr/bin/env bash
# The README's main job on the bundled default data: set up (idempotent), then run the
# digits example end to end (train -> QoS-Nets search -> BN-only fine-tune -> qos-compile
# for arm -> qos-run under qemu switching OPs -> bench table). Output: runs/digits/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-$(nproc)}"
exec .venv/bin/python examples/digits_end_to_end/run.py "$@"
