#!/usr/bin/env bash
# The README's test command: set up (scripts/setup.sh with the test extras), then run every test, slow ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ".[test]"
. "${VENV:-.venv}/bin/activate"
python -m pytest "$@"
