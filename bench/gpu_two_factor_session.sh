#!/usr/bin/env bash
# One device call for the two-factor kernels: build, their CUDA tests (fail fast), the older
# CUDA tests, a memcheck pass, then the Kaggle-7 benchmark (TBE columns need the staged stack).
# Usage on the GPU machine, from the repository root: bash bench/gpu_two_factor_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f /root/gw/env.sh ] && . /root/gw/env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 TORCHREC_TT_CUDA=1 MAX_JOBS=16 \
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { grep -E "error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"; exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "build: $(( $(date +%s) - t0 )) s"
timeout 240 python3 -m pytest tests/test_ops.py -q -x -k "two_factor" -p no:cacheprovider -rfE \
  > "$OUT/tests_two_factor.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error|assert" "$OUT/tests_two_factor.txt" | head -30
echo "two-factor tests: $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest tests/test_ops.py tests/test_kernel_options.py -q -k "cuda and not two_factor" \
    -p no:cacheprovider -rfE > "$OUT/tests_cuda.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_cuda.txt" | tail -15
  echo "cuda tests: $(( $(date +%s) - t0 )) s"
fi
if [ "${SKIP_MEMCHECK:-0}" != 1 ]; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest tests/test_ops.py -q -x -p no:cacheprovider \
    -k "two_factor_kaggle_sized_shapes and q0 or two_factor_out_of_range" \
    2>&1 | tail -4 | tee "$OUT/memcheck.txt"
  echo "memcheck: $(( $(date +%s) - t0 )) s"
fi
python3 bench/bench_embedding_bag.py --kaggle7 --iters ${ITERS:-20} 2>&1 | tee "$OUT/kaggle7.txt" | tail -16
echo "total: $(( $(date +%s) - t0 )) s"
