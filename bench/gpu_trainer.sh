#!/usr/bin/env bash
# Issue 12's GPU measurement, for a gpu_round.sh call (EXTRA=bench/gpu_trainer.sh): the DLRM
# trainer's own step time (what its progress bar and summary report: device-made synthetic
# batches, TrainPipelineSparseDist, losses read every --log_every steps), TT and uncompressed
# in one run, at B=8,192 and 65,536. Compare with bench/bench_dlrm_step.py (the same model,
# batches already on the GPU) of the same round. Writes into $OUT.
set -uo pipefail
for spec in "8192 400 100" "65536 120 40"; do
  set -- $spec
  timeout 240 python3 examples/dlrm/train.py --device cuda --mode compare --batch_size $1 \
    --steps $2 --log_every $3 --no_progress --out "$OUT/trainer_b$1" > "$OUT/trainer_b$1.txt" 2>&1
  echo "trainer B=$1: rc $?"
  grep -E "step_ms|samples_per_s|^ *(tt|TT|uncompressed|baseline) " "$OUT/trainer_b$1.txt" | tail -6
done
