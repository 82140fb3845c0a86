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
deps_hash=$(cat requirements/*.txt | sha1sum | cut -c1-40)
if [ "$(cat "$stamp" 2>/dev/null)" != "$deps_hash" ]; then
  "$VPY" -m pip install -q --upgrade pip setuptools wheel
  "$VPY" -m pip install -q -r requirements/torch.txt
  "$VPY" -m pip install -q --no-deps -r requirements/no-deps.txt
  "$VPY" -m pip install -q -r requirements/base.txt
  echo "$deps_hash" > "$stamp"
fi
# --no-build-isolation: build against the torch already in the venv, never a fresh download.
build_stamp=.venv/.ext-built
src_hash=$(cat setup.py csrc/* 2>/dev/null | sha1sum | cut -c1-40)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$src_hash" ] || ! "$VPY" -c "import torchrec_tt._C" 2>/dev/null; then
  "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$src_hash" > "$build_stamp"
fi
