#!/usr/bin/env bash
# The main job on its embedded default: sets up .venv (first run only), builds the extension,
# then trains TorchRec's DLRM on synthetic Criteo-format data (Kaggle-size tables) on 2 local
# CPU processes, the 7 largest tables in TT at rank 32 against the uncompressed model, and prints
# the summary (last line: auc=... compression=...). Extra arguments go to the trainer
# (examples/dlrm/train.py --help); outputs land in runs/dlrm/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python examples/dlrm/train.py --nproc 2 --mode compare --steps 600 \
  --eval_samples 65536 --out runs/dlrm "$@"
