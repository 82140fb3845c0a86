#!/usr/bin/env bash
# For a gpu_round.sh call (EXTRA=bench/gpu_synthetic.sh): the device-side synthetic generator's
# cost per batch on the GPU, one batch per call against several (issue 12). Writes into $OUT.
set -uo pipefail
for b in 8192 65536; do
  timeout 120 python3 bench/bench_synthetic.py --device cuda --batch-size $b --per-call 1 16 \
    > "$OUT/synthetic_b$b.txt" 2>&1
  echo "synthetic B=$b: rc $?"; tail -4 "$OUT/synthetic_b$b.txt"
done
