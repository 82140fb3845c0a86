#!/usr/bin/env bash
# Creates .venv with the pinned stack and builds torchrec_tt._C in place. Idempotent: a second
# run only rebuilds the extension when csrc/ or setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.deps-installed
deps_rev=3  # bump when the pins below change
if [ "$(cat "$stamp" 2>/dev/null)" != "$deps_rev" ]; then
  "$VPY" -m pip install -q --upgrade pip setuptools wheel ninja
  # torch's CPU wheel: a bare `torch` would pull a multi-GB CUDA build.
  "$VPY" -m pip install -q torch==2.13.0
  # torchrec's metadata asks for the CUDA fbgemm-gpu; the CPU build is what loads here.
  "$VPY" -m pip install -q --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.6.1
  "$VPY" -m pip install -q tensordict torchmetrics==1.0.3 tqdm pyre-extensions numpy pytest hypothesis \
      "iopath" "typing-inspect"
  echo "$deps_rev" > "$stamp"
fi
# --no-build-isolation: build against the torch already in the venv, never a fresh download.
build_stamp=.venv/.ext-built
src_hash=$(cat setup.py csrc/* 2>/dev/null | sha1sum | cut -c1-40)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$src_hash" ] || ! "$VPY" -c "import torchrec_tt._C" 2>/dev/null; then
  "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$src_hash" > "$build_stamp"
fi
