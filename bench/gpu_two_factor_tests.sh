#!/usr/bin/env bash
# For a gpu_round.sh call with SKIP_KERNEL=1 (EXTRA=bench/gpu_two_factor_tests.sh ...): only the
# two-factor kernels' tests (every mode against float64), without the benchmarks. Writes into $OUT.
set -uo pipefail
timeout 240 python3 -m pytest tests/test_ops.py -q -x -k "two_factor" -p no:cacheprovider -rfE \
  > "$OUT/tests_two_factor.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|^E " "$OUT/tests_two_factor.txt" | head -12
