#!/usr/bin/env bash
# The timing-sensitive tests (marker `timing`: kills, interrupts, time limits) N times in a row (default
# 20) at each pace: as they are, with the worker artificially fast (KOALA_TEST_PACE=fast: zeros for Lab,
# the stand-in forward pass) and slow (KOALA_TEST_PACE=slow: every forward pass waits 0.5 s). Stops at
# the first failure. Usage: testkit/repeat.sh [N] [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
shift || true
for pace in "" fast slow; do
  for i in $(seq "$n"); do
    start=$(date +%s)
    KOALA_TEST_PACE=$pace .venv/bin/pytest -q -m "timing and not slow" "$@" >/tmp/koala-repeat.log 2>&1 \
      || { echo "pace=${pace:-as is} run $i FAILED"; tail -40 /tmp/koala-repeat.log; exit 1; }
    echo "pace=${pace:-as is} run $i passed ($(( $(date +%s) - start )) s): $(tail -1 /tmp/koala-repeat.log)"
  done
done
