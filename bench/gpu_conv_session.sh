#!/usr/bin/env bash
# One device call for the TT convolution (issue 6): build the extension with the conv CUDA kernels,
# run the CUDA conv tests, the benchmark, optionally a CIFAR-10 run, then a compute-sanitizer
# memcheck pass. Usage on the GPU machine, from the repository root:
#   CIFAR_ARGS="--epochs 10 ..." bash bench/gpu_conv_session.sh [bench_conv.py args]
# SKIP_TESTS=1 / SKIP_BENCH=1 / SKIP_MEMCHECK=1 skip those steps; TESTS_TIMEOUT, BENCH_TIMEOUT, CIFAR_TIMEOUT,
# MEMCHECK_TIMEOUT bound each step (seconds). The CIFAR run reads .data/cifar10 (a copy carried
# with the call). The built extension is copied to $OUT; PREBUILT_SO=path reuses such a copy.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
date -u +"date %Y-%m-%dT%H:%M:%SZ"
# The GPU machine has torch but no torchrec/fbgemm_gpu; the conv path needs neither (stand-ins,
# see tools/torchrec_stub/_stubpkg.py; any other missing package the tree imports is stubbed too).
. bench/gpu_stub_env.sh

build() {
  local t0; t0=$(date +%s)
  # Build only this issue's CUDA file: other .cu files in the tree are others' work in progress.
  for f in csrc/*.cu; do [ "$f" = csrc/conv_cuda.cu ] || mv "$f" /tmp/; done
  TORCH_CUDA_ARCH_LIST=9.0 TORCHREC_TT_CUDA=1 MAX_JOBS=16 \
    python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 \
    || { grep -E "error" /tmp/build.log | head -30; tail -20 /tmp/build.log; exit 1; }
  grep -E "building" /tmp/build.log | head -3
  cp torchrec_tt/_C*.so "$OUT/" 2>/dev/null
  echo "build: $(( $(date +%s) - t0 )) s"
}

if [ -n "${PREBUILT_SO:-}" ] && [ -f "$PREBUILT_SO" ]; then
  # The extension this script built on an earlier call, carried back in.
  cp "$PREBUILT_SO" torchrec_tt/ && echo "build: reusing $PREBUILT_SO"
  import_ok || { echo "prebuilt extension does not load: rebuilding"; build; import_ok || exit 1; }
else
  build
  import_ok || exit 1
fi
echo "import torchrec_tt: ok"

if [ -z "${SKIP_TESTS:-}" ]; then
  t0=$(date +%s)
  timeout "${TESTS_TIMEOUT:-100}" python3 -m pytest tests/test_conv.py -q -p no:cacheprovider -k cuda \
    2>&1 | tail -25 | tee "$OUT/tests.txt"
  echo "tests: $(( $(date +%s) - t0 )) s"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  t0=$(date +%s)
  timeout "${BENCH_TIMEOUT:-160}" python3 bench/bench_conv.py --json "$OUT/bench.json" "$@" 2>&1 \
    | tee "$OUT/bench.txt" | grep -v '^{'
  echo "bench: $(( $(date +%s) - t0 )) s"
fi

if [ -n "${CIFAR_ARGS:-}" ]; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${CIFAR_TIMEOUT:-240}" python3 examples/cnn/train.py --data .data/cifar10 --no-progress \
    --out "$OUT" $CIFAR_ARGS 2>&1 | tee "$OUT/cifar.txt" | tail -20
  echo "cifar: $(( $(date +%s) - t0 )) s"
fi

if [ -z "${SKIP_MEMCHECK:-}" ]; then
  t0=$(date +%s)
  timeout "${MEMCHECK_TIMEOUT:-60}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 bench/conv_memcheck.py 2>&1 | tail -20 | tee "$OUT/memcheck.txt"
  echo "memcheck: $(( $(date +%s) - t0 )) s (exit ${PIPESTATUS[0]})"
fi
