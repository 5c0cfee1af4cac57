#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One pytest worker per core (pytest-xdist), each file's tests in one worker (tests/conftest.py),
# one compute thread per worker: oversubscribed cores made multi-threaded tests several times slower.
workers="${QOS_TEST_WORKERS:-$(nproc)}"
if [ "$workers" -gt 1 ]; then
  export TVM_NUM_THREADS="${TVM_NUM_THREADS:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  exec .venv/bin/python -m pytest -q -n "$workers" --dist loadgroup --durations=15 "$@"
fi
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-$(nproc)}"
exec .venv/bin/python -m pytest -q --durations=15 "$@"
