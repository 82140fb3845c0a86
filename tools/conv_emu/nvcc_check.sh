#!/usr/bin/env bash
# Compile-checks csrc/conv_cuda.cu for sm_90 with nvcc on a machine whose torch is a CPU wheel
# (which ships the CUDA headers of ATen/c10 but not the generated cuda_cmake_macros.h, stubbed
# here). Prints ptxas register/spill usage of every kernel. Usage: tools/conv_emu/nvcc_check.sh [file.cu]
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:-csrc/conv_cuda.cu}
PY=${PYTHON:-.venv/bin/python}
TI=$($PY -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
STUB=$(mktemp -d)
mkdir -p "$STUB/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
nvcc -std=c++17 -O3 --use_fast_math -arch=sm_90 -c "$SRC" -o "$STUB/out.o" -I csrc -I "$STUB" \
  -I "$TI" -I "$TI/torch/csrc/api/include" -I "$PYINC" -D_GLIBCXX_USE_CXX11_ABI=1 -Xptxas -v 2>&1 \
  | grep -E "error|Compiling entry|Used|spill" || true
test -s "$STUB/out.o" && echo "nvcc_check: OK ($SRC)"
rm -rf "$STUB"
