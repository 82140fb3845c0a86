#!/usr/bin/env bash
# Builds and runs the CPU emulation of the lossy comms CUDA kernels (no GPU needed).
# Usage: tools/conv_emu/run_lossy.sh
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p /tmp/tt_lossy_emu
g++ -std=c++20 -O2 -pthread -Wall -Wno-unknown-pragmas -I. lossy_emu_test.cpp \
  -o /tmp/tt_lossy_emu/lossy_emu_test
exec /tmp/tt_lossy_emu/lossy_emu_test "$@"
