#!/usr/bin/env bash
# For a gpu_round.sh call (EXTRA=bench/gpu_hook_ab.sh): the sharded fused update as a hook on the
# TT op's C++ autograd node (the default) against the identity views of _FusedUpdateInBackward
# (TORCHREC_TT_FUSED_UPDATE_HOOK=0), on CUDA: their tests (tests/test_fused_update_hook.py runs
# the CUDA case), the host cost of the step (bench_step_host.py --device cuda) and the DLRM step
# (bench_dlrm_step.py, DLRM_ARGS as gpu_round.sh). Writes into $OUT.
set -uo pipefail
timeout 150 python3 -m pytest tests/test_fused_update_hook.py tests/test_fused_update_batched.py tests/test_hot_cache.py -q \
  -p no:cacheprovider -rfE > "$OUT/tests_fused_update_hook_cuda.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_fused_update_hook_cuda.txt" | tail -3
args=${DLRM_ARGS:---batch-sizes 8192 65536 --tt-cores 2 --steps 40}
# The host cost is the A/B (deterministic counts, per-phase host time); the step itself once,
# with the default (the hook): its run-to-run spread (~15%) is larger than the difference.
TORCHREC_TT_FUSED_UPDATE_HOOK=0 timeout 200 python3 bench/bench_step_host.py --device cuda \
  --batch-size 8192 --scale 1.0 --steps 50 --models tt > "$OUT/step_host_cuda_hook0.txt" 2>&1
timeout 200 python3 bench/bench_step_host.py --device cuda \
  --batch-size 8192 --scale 1.0 --steps 50 > "$OUT/step_host_cuda_hook1.txt" 2>&1
timeout 200 python3 bench/bench_dlrm_step.py $args > "$OUT/dlrm_step_hook1.txt" 2>&1
for v in 0 1; do
  echo "== TORCHREC_TT_FUSED_UPDATE_HOOK=$v"
  grep -E "^\| (TT|uncompressed)" "$OUT/step_host_cuda_hook$v.txt" | head -4
done
grep -E "^\| [0-9]" "$OUT/dlrm_step_hook1.txt" | head -4
