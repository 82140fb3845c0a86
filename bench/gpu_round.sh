#!/usr/bin/env bash
# The device call after the staged stack's last part: install it, then the two-factor session
# (build, tests, memcheck, Kaggle-7 benchmark), the profile and the DLRM step.
# Usage: bash bench/gpu_round.sh   (from the repository root, .gpu-wheels/p3 carried)
set -uo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .gpu-wheels/p3 ] && [ ! -f /root/gw/env.sh ]; then
  bash .gpu-wheels/p3/install.sh 2>&1 | tail -2
fi
. /root/gw/env.sh
bash bench/gpu_two_factor_session.sh
export PYTHONPATH=$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
python3 bench/profile_embedding_bag.py --kaggle7 --dim 16 2>&1 > "$OUT/profile_d16.txt"
python3 bench/profile_embedding_bag.py --kaggle7 --dim 64 2>&1 > "$OUT/profile_d64.txt"
head -30 "$OUT/profile_d64.txt" | cut -c1-160
timeout 300 python3 bench/bench_dlrm_step.py 2>&1 | tee "$OUT/dlrm_step.txt" | tail -9
