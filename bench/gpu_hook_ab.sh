#!/usr/bin/env bash
# For a gpu_round.sh call (EXTRA=bench/gpu_hook_ab.sh): the sharded fused update's hook on the
# TT op's C++ autograd node, on CUDA. Its tests (tests/test_fused_update_hook.py, the CUDA case)
# and the DLRM step with the identity views (what CUDA runs today) against the hook (the lookup
# with its CPU-only condition removed for this run). DLRM_ARGS as gpu_round.sh. Writes into $OUT.
set -uo pipefail
timeout 120 python3 -m pytest tests/test_fused_update_hook.py tests/test_fused_update_batched.py -q \
  -p no:cacheprovider -rfE > "$OUT/tests_fused_update_hook_cuda.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_fused_update_hook_cuda.txt" | tail -3
args=${DLRM_ARGS:---batch-sizes 8192 65536 --tt-cores 2 --steps 40}
timeout 200 python3 bench/bench_dlrm_step.py $args > "$OUT/dlrm_step_views.txt" 2>&1
cp sharding/lookup.py /tmp/lookup.py.orig
python3 - <<'PY'
p = "sharding/lookup.py"
s = open(p).read()
old = 'not params or params[0].device.type == "cpu"'
assert old in s, "the CPU-only condition moved; update bench/gpu_hook_ab.sh"
open(p, "w").write(s.replace(old, "True"))
PY
timeout 200 python3 bench/bench_dlrm_step.py $args > "$OUT/dlrm_step_hook.txt" 2>&1
cp /tmp/lookup.py.orig sharding/lookup.py
for v in views hook; do echo "== $v"; grep -E "^\|" "$OUT/dlrm_step_$v.txt" | head -8; done
