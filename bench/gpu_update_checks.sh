#!/usr/bin/env bash
# For a gpu_round.sh call (EXTRA=bench/gpu_update_checks.sh, after its build): the fused TT
# update's CUDA tests (one finiteness check for all tables, skipped updates). Writes into $OUT.
set -uo pipefail
timeout 120 python3 -m pytest tests/test_fused_update_batched.py -q -p no:cacheprovider -rfE \
  > "$OUT/tests_fused_update_cuda.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_fused_update_cuda.txt" | tail -3
