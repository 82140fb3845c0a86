#!/usr/bin/env bash
# For a gpu_round.sh call (EXTRA=bench/gpu_dlrm_gc.sh): the one-GPU DLRM step with everything
# built before the timing frozen out of the garbage collector's reach (bench_dlrm_step.py
# --gc-freeze; compare the round's dlrm_step.txt, same DLRM_ARGS, collector as is), and the
# host cost of the step on this machine (bench_step_host.py --device cuda). Writes into $OUT.
set -uo pipefail
args=${DLRM_ARGS:---batch-sizes 8192 65536 --tt-cores 2 --steps 40}
timeout 240 python3 bench/bench_dlrm_step.py $args --gc-freeze > "$OUT/dlrm_step_gc_freeze.txt" 2>&1
echo "dlrm step, gc.freeze(): rc $?"
grep -E "^\|" "$OUT/dlrm_step_gc_freeze.txt" | head -6
timeout 200 python3 bench/bench_step_host.py --device cuda --batch-size 8192 --scale 1.0 --steps 50 \
  > "$OUT/step_host_cuda.txt" 2>&1
echo "step host (cuda): rc $?"
