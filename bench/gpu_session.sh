#!/usr/bin/env bash
# One device call: (optionally) install the staged TorchRec stack, build the CUDA extension,
# run the CUDA tests, a compute-sanitizer memcheck pass on a small subset, and the benchmark.
# Usage on the GPU machine, from the repository root:  bash bench/gpu_session.sh [bench args]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f /root/gw/env.sh ] && . /root/gw/env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
t0=$(date +%s)
# In place (no pip): the machine has no package index for pip's build isolation.
TORCH_CUDA_ARCH_LIST=9.0 TORCHREC_TT_CUDA=1 MAX_JOBS=16 \
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { grep -E "error|Error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"; exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "build: $(( $(date +%s) - t0 )) s"
timeout 300 python3 -m pytest tests/test_ops.py tests/test_kernel_options.py -q -k cuda -p no:cacheprovider \
  -rfE > "$OUT/tests.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.txt" | tail -30
timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest tests/test_ops.py tests/test_kernel_options.py -q -x -p no:cacheprovider \
  -k "cuda_empty_batch or cuda_float32_tensor or (cuda_float32 and (4096-q0 or 16384-q2)) or (options_match and (3-True-2 or 3-False-3 or 4-True-1)) or (contribute_zero and 1-cuda)" \
  2>&1 | tail -6 | tee "$OUT/memcheck.txt"
python3 bench/profile_embedding_bag.py 2>&1 | tail -25 > "$OUT/profile.txt"
[ "${SKIP_BENCH:-0}" = 1 ] || python3 bench/bench_embedding_bag.py "$@" 2>&1 | tee "$OUT/bench.txt"
