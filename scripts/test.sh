#!/usr/bin/env bash
# The test command: sets up .venv (first run only), builds the extension, runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest tests -q "$@"
