#!/usr/bin/env bash
# Extra benchmarks for a gpu_round.sh call (EXTRA=bench/gpu_extra.sh): the lossy comms codec's
# CUDA tests and throughput (issue 16; SKIP_LOSSY_CODEC skips them) and MLET's one-GPU step
# cost (issue 17; SKIP_MLET skips it).
# Writes into $OUT.
set -uo pipefail
if [ -z "${SKIP_LOSSY_CODEC:-}" ]; then
  # the compiled codec's CUDA kernels against the torch-op reference, then both benchmarks
  timeout 300 python3 -m pytest tests/test_lossy_comms.py -q -k cuda > "$OUT/lossy_cuda_tests.txt" 2>&1
  echo "lossy codec cuda tests: rc $?"; tail -3 "$OUT/lossy_cuda_tests.txt"
  timeout 120 python3 bench/bench_lossy_codec.py --device cuda --repeats 5 > "$OUT/lossy_codec.txt" 2>&1
  echo "lossy codec: rc $?"
  timeout 120 python3 bench/bench_lossy_codec.py --device cuda --repeats 5 --no_flush_l2 \
    > "$OUT/lossy_codec_warm.txt" 2>&1
  echo "lossy codec (L2 warm): rc $?"
  grep -E "^device|compiled" "$OUT/lossy_codec.txt" "$OUT/lossy_codec_warm.txt" | cut -c1-160
fi
if [ -z "${SKIP_MLET:-}" ]; then
  timeout 120 python3 bench/mlet_step.py --device cuda --scale 1 --batch_size 8192 --steps 100 \
    --factors 0 4 --out "$OUT/mlet" > "$OUT/mlet_step.txt" 2>&1
  echo "mlet step: rc $?"
fi
[ -f "$OUT/lossy_codec.txt" ] && grep -E "^\|" "$OUT/lossy_codec.txt" | head -20
[ -f "$OUT/mlet_step.txt" ] && grep -E "^\|" "$OUT/mlet_step.txt" | head -10
