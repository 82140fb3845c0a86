#!/usr/bin/env bash
# One device call after the staged stack's parts p0..p2 were copied (bench/gpu_round.sh carries
# p3): install the stack, build, the two-factor tests, the Kaggle-7 benchmark, the one-GPU DLRM
# step, the older CUDA tests, a memcheck pass and the profile, most important first.
# Usage on the GPU machine, from the repository root:  bash bench/gpu_round.sh
# Switches: SKIP_KERNEL (no two-factor tests, Kaggle-7, offload or memcheck), SKIP_OFFLOAD, SKIP_OLDER_TESTS,
# SKIP_DLRM, SKIP_PROFILE (any value), DLRM_ARGS (bench_dlrm_step.py's flags),
# DLRM_PROFILE_BATCHES (default 8192), PROFILE_BATCHES (the kernels' torch.profiler tables;
# default 65536), NCU_DIMS (default
# "64 16"), NCU_SOURCE (D list) and NCU_SOURCE_KERNELS (see below), EXTRA="scripts" run
# before the profiles, ITERS (default 20), PACK=1 (everything under $OUT in one archive).
set -uo pipefail
export PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .gpu-wheels/p3 ] && [ ! -f /root/gw/env.sh ]; then
  bash .gpu-wheels/p3/install.sh 2>&1 | tail -1
fi
. /root/gw/env.sh
[ -e torchrec_tt/sharding ] || ln -s ../sharding torchrec_tt/sharding  # what the editable install maps
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 TORCHREC_TT_CUDA=1 MAX_JOBS=16 \
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
export PYTHONPATH=$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
echo "build: $(( $(date +%s) - t0 )) s"
if [ -z "${SKIP_KERNEL:-}" ]; then
  timeout 240 python3 -m pytest tests/test_ops.py -q -x -k "two_factor" -p no:cacheprovider -rfE \
    > "$OUT/tests_two_factor.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed|^E " "$OUT/tests_two_factor.txt" | head -12
  echo "two-factor tests: $(( $(date +%s) - t0 )) s"
  python3 bench/bench_embedding_bag.py --kaggle7 --iters ${ITERS:-20} > "$OUT/kaggle7.txt" 2>&1
  echo "kaggle7: $(( $(date +%s) - t0 )) s"
  if [ -z "${SKIP_OFFLOAD:-}" ]; then
    timeout 120 python3 bench/bench_embedding_bag.py --offload --iters ${ITERS:-20} > "$OUT/offload.txt" 2>&1
    echo "offload: $(( $(date +%s) - t0 )) s"
  fi
fi
if [ -z "${SKIP_DLRM:-}" ]; then
  timeout 240 python3 bench/bench_dlrm_step.py ${DLRM_ARGS:-} > "$OUT/dlrm_step.txt" 2>&1
  for b in ${DLRM_PROFILE_BATCHES:-8192}; do
    timeout 120 python3 bench/bench_dlrm_step.py --batch-sizes $b --tt-cores 2 --steps 20 --profile \
      > "$OUT/dlrm_profile_$b.txt" 2>&1
  done
fi
echo "dlrm: $(( $(date +%s) - t0 )) s"
if [ -z "${SKIP_OLDER_TESTS:-}" ]; then
  timeout 150 python3 -m pytest tests/test_ops.py tests/test_kernel_options.py -q -k "cuda and not two_factor" \
    -p no:cacheprovider -rfE > "$OUT/tests_cuda.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_cuda.txt" | tail -6
fi
if [ -z "${SKIP_KERNEL:-}" ]; then
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest tests/test_ops.py -q -x -p no:cacheprovider \
    -k "two_factor_kaggle_sized_shapes and D16 or two_factor_out_of_range" 2>&1 | tail -2 | tee "$OUT/memcheck.txt"
fi
# Further benchmarks of the round (e.g. bench/gpu_extra.sh), before the profiles.
for script in ${EXTRA:-}; do bash "$script"; done
if [ -z "${SKIP_PROFILE:-}" ]; then
  for b in ${PROFILE_BATCHES:-65536}; do
    for d in 16 64; do
      timeout 60 python3 bench/profile_embedding_bag.py --kaggle7 --dim $d --batch $b \
        > "$OUT/profile_d${d}_b$b.txt" 2>&1
    done
  done
  for d in ${NCU_DIMS:-64 16}; do
    timeout 100 ncu --clock-control none -k regex:"forward_rank_kernel|forward_kernel|grad_kernel" -c 3 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      python3 bench/profile_embedding_bag.py --kaggle7 --dim $d > "$OUT/ncu_d$d.txt" 2>&1
  done
fi
# NCU_SOURCE="16": one grad_kernel launch per listed D under ncu's full set, with the per-SASS-line
# stall samples exported as CSV (bench/ncu_hot_lines.py summarises it on the workstation).
# NCU_SOURCE_KERNELS (default "grad_kernel") names the kernels, one report each.
for d in ${NCU_SOURCE:-}; do
  for k in ${NCU_SOURCE_KERNELS:-grad_kernel}; do
    timeout 150 ncu --clock-control none -k regex:"$k" -s 2 -c 1 --set full -f -o "$OUT/${k}_d$d" \
      python3 bench/profile_embedding_bag.py --kaggle7 --dim $d > "$OUT/ncu_full_${k}_d$d.txt" 2>&1
    ncu -i "$OUT/${k}_d$d.ncu-rep" --page source --csv --print-source sass > "$OUT/${k}_d${d}_sass.csv" 2>&1
    ncu -i "$OUT/${k}_d$d.ncu-rep" --page details > "$OUT/${k}_d${d}_details.txt" 2>&1
    python3 bench/ncu_hot_lines.py "$OUT/${k}_d${d}_sass.csv" > "$OUT/${k}_d${d}_hot.txt" 2>&1
    rm -f "$OUT/${k}_d$d.ncu-rep"
  done
done
echo "total: $(( $(date +%s) - t0 )) s"
[ -f "$OUT/kaggle7.txt" ] && grep -E "^\|" "$OUT/kaggle7.txt" | cut -d'|' -f2-3,6,9-12
[ -f "$OUT/offload.txt" ] && grep -E "^\|" "$OUT/offload.txt"
[ -f "$OUT/dlrm_step.txt" ] && grep -E "^\|" "$OUT/dlrm_step.txt" | head -8
# PACK=1: everything under $OUT in one archive (the device tool returns at most 8 files).
if [ -n "${PACK:-}" ]; then
  tar czf /tmp/round.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/round.tgz "$OUT/round.tgz"
fi
