#!/usr/bin/env bash
# Builds and runs the CPU emulation of the fused TT-conv CUDA kernels (no GPU needed).
# Usage: tools/conv_emu/run.sh [quick]
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p /tmp/tt_conv_emu
g++ -std=c++20 -O2 -pthread -Wall -Wno-unknown-pragmas -I. emu_test.cpp -o /tmp/tt_conv_emu/emu_test
exec /tmp/tt_conv_emu/emu_test "$@"
