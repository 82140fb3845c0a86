#!/usr/bin/env bash
# The main job on its embedded default: sets up .venv (first run only), builds the extension,
# then runs the quick-start demo. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
