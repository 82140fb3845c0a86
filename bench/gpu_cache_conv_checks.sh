#!/usr/bin/env bash
# For a gpu_round.sh call (EXTRA=bench/gpu_cache_conv_checks.sh, after its build): the hot-row
# cache on CUDA (issue 14: tests/test_hot_cache.py's CUDA test) and the TT convolution dispatch
# (issue 19: bench/gpu_conv_round.sh without the CNN run: CUDA conv tests, bench_conv.py with the
# "TTConv2d auto" columns). Writes into $OUT.
set -uo pipefail
timeout 120 python3 -m pytest tests/test_hot_cache.py -q -p no:cacheprovider -rfE -k cuda \
  > "$OUT/tests_hot_cache_cuda.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|skipped" "$OUT/tests_hot_cache_cuda.txt" | tail -3
SKIP_CNN=1 BENCH_TIMEOUT=150 bash bench/gpu_conv_round.sh 2>&1 | tail -12
