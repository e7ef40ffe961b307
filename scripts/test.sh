#!/usr/bin/env bash
# The README's test command: set up (scripts/setup.sh with the test extras), then run every test, slow ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ".[test]"
# The comparison page is tested in Debian's headless Chromium; install it where we can (root with apt-get), else the
# page test skips and says why.
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
        || echo "note: could not install chromium + chromium-driver; the browser test will skip" >&2
fi
. "${VENV:-.venv}/bin/activate"
python -m pytest --durations=15 "$@"  # the slowest tests, to keep the suite under 10 minutes
