#!/usr/bin/env bash
# One device call for issue 19 (TTConv2d dispatch: fused op or three cuDNN convolutions), ~3-5
# minutes on one H200 when the extension is already built: the CUDA conv tests, bench_conv.py with
# the "TTConv2d auto" columns, and the WRN-28-10 training throughput (images/s) of dense vs TT
# (stages 2+3, rank 32, --conv-path auto) in one run, bf16, batch 128, on random images (no data
# to carry). Prints a short table last. Usage on the GPU machine, from the repository root:
#   bash bench/gpu_conv_round.sh
# Environment: the staged stack of bench/gpu_round.sh when present (/root/gw/env.sh, or
# .gpu-wheels/p3 after p0..p2 were copied), else the stand-ins of tools/torchrec_stub (the conv
# path needs neither torchrec nor fbgemm_gpu). Extension: reused when torchrec_tt/_C*.so (e.g.
# from bench/gpu_round.sh's build step on this machine, or PREBUILT_SO=path, a copy carried in)
# has the CUDA conv kernels; otherwise built with gpu_round.sh's build line (minutes; not in the
# estimate above) and copied to $OUT.
# Switches: SKIP_TESTS, SKIP_BENCH, SKIP_CNN (any value); CNN_STEPS (default 300), CNN_FUSED=1 adds
# a third model, TT with --conv-path fused; CNN_COMPILE=inductor (or aot_eager) adds the dense/TT
# pair compiled (untried: compile time on top, minutes); TESTS_TIMEOUT / BENCH_TIMEOUT /
# CNN_TIMEOUT (seconds).
set -uo pipefail
export PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ -d .gpu-wheels/p3 ] && [ ! -f /root/gw/env.sh ] && ls /root/gw/fbgemm.txz.part0* > /dev/null 2>&1; then
  bash .gpu-wheels/p3/install.sh 2>&1 | tail -1
fi
[ -f /root/gw/env.sh ] && . /root/gw/env.sh
[ -e torchrec_tt/sharding ] || ln -s ../sharding torchrec_tt/sharding  # what the editable install maps
. bench/gpu_stub_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
date -u +"date %Y-%m-%dT%H:%M:%SZ"
echo "stack: $(python3 -c 'import torchrec, sys; print("torchrec", torchrec.__file__)' 2>/dev/null || echo none)"

has_cuda_conv() {  # the loaded extension has the CUDA conv kernels
  python3 - <<'PY' > /dev/null 2>&1
import torch, torchrec_tt  # noqa: F401
z = lambda *s: torch.zeros(*s, device="cuda")  # noqa: E731
torch.ops.torchrec_tt.tt_conv2d_kernel_info(z(1, 16, 4, 4), z(8, 16, 1, 1), z(8, 8, 3, 3),
                                            z(16, 8, 1, 1), [1, 1], [1, 1], [1, 1])
PY
}

if [ -n "${PREBUILT_SO:-}" ] && [ -f "$PREBUILT_SO" ]; then
  cp "$PREBUILT_SO" torchrec_tt/ && echo "extension: $PREBUILT_SO"
fi
if import_ok && has_cuda_conv; then
  echo "extension: reusing $(ls torchrec_tt/_C*.so)"
else
  t0=$(date +%s)
  echo "extension: missing or without CUDA kernels; building (gpu_round.sh's build line)"
  TORCH_CUDA_ARCH_LIST=9.0 TORCHREC_TT_CUDA=1 MAX_JOBS=16 \
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
  import_ok && has_cuda_conv || { echo "the built extension has no CUDA conv kernels"; exit 1; }
  cp torchrec_tt/_C*.so "$OUT/"  # carry it back in with PREBUILT_SO=... on a fresh machine
  echo "build: $(( $(date +%s) - t0 )) s"
fi

if [ -z "${SKIP_TESTS:-}" ]; then
  t0=$(date +%s)
  # The CUDA conv tests, and all of the dispatch tests (their CPU part checks torch.compile on
  # this machine's torch too).
  timeout "${TESTS_TIMEOUT:-180}" python3 -m pytest tests/test_conv.py tests/test_conv_dispatch.py \
    -q -p no:cacheprovider -rfE -k "cuda or test_conv_dispatch" > "$OUT/tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed|^E " "$OUT/tests.txt" | head -15
  echo "tests: $(( $(date +%s) - t0 )) s"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  t0=$(date +%s)
  # --no-tile-sweep: the fused kernel's tile variants are not what this round measures.
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/bench_conv.py --ranks 32 --iters 20 --no-tile-sweep \
    --json "$OUT/bench_conv.json" > "$OUT/bench_conv.txt" 2>&1
  rc=$?
  echo "bench_conv: $(( $(date +%s) - t0 )) s (exit $rc)"
  grep -v '^{' "$OUT/bench_conv.txt" | tail -60
fi

if [ -z "${SKIP_CNN:-}" ]; then
  t0=$(date +%s)
  steps=${CNN_STEPS:-300}
  common=(--synthetic $((steps * 128)) --test-limit 1000 --epochs 1 --limit-batches "$steps"
          --batch-size 128 --amp bf16 --tt 2,3:32 --device cuda --no-progress --warmup-steps 20)
  timeout "${CNN_TIMEOUT:-240}" python3 examples/cnn/train.py "${common[@]}" --models dense,tt \
    --conv-path auto --out "$OUT/cnn" > "$OUT/cnn.txt" 2>&1
  rc=$?
  echo "cnn (dense, TT auto): $(( $(date +%s) - t0 )) s (exit $rc)"
  [ "$rc" = 0 ] || tail -5 "$OUT/cnn.txt"
  if [ -n "${CNN_FUSED:-}" ]; then
    timeout "${CNN_TIMEOUT:-240}" python3 examples/cnn/train.py "${common[@]}" --models tt \
      --conv-path fused --out "$OUT/cnn_fused" > "$OUT/cnn_fused.txt" 2>&1
    echo "cnn (TT fused): $(( $(date +%s) - t0 )) s"
  fi
  if [ -n "${CNN_COMPILE:-}" ]; then
    timeout "${CNN_TIMEOUT:-240}" python3 examples/cnn/train.py "${common[@]}" --models dense,tt \
      --conv-path auto --compile "$CNN_COMPILE" --out "$OUT/cnn_compiled" > "$OUT/cnn_compiled.txt" 2>&1
    rc=$?
    echo "cnn (dense, TT auto; compiled, $CNN_COMPILE): $(( $(date +%s) - t0 )) s (exit $rc)"
  fi
fi

echo "total: $(( $(date +%s) - T0 )) s"
echo
[ -f "$OUT/tests.txt" ] && echo "tests: $(grep -E 'passed|failed' "$OUT/tests.txt" | tail -1)"
if [ -f "$OUT/bench_conv.txt" ]; then
  # The dispatch table: forward and train step, dense / 3x cuDNN / TT op / TTConv2d auto.
  sed -n '/^### TTConv2d auto/,/^### checks/p' "$OUT/bench_conv.txt" | grep -E '^\|'
fi
for f in "$OUT/cnn.txt" "$OUT/cnn_fused.txt" "$OUT/cnn_compiled.txt"; do
  [ -f "$f" ] && grep -E '^\| ' "$f" | cut -d'|' -f2,3,8-11
done
