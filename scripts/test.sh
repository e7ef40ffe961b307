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
# One pytest worker per core (pytest-xdist), each with one torch thread: much of a test's time is single-threaded
# (imports, tokenizers, HTTP, small kernels), so two workers keep both cores busy where one worker with two threads
# leaves one idle (on 2 cores: 8.7 minutes against 14.7). Whole files go to one worker, so a file's module fixtures
# (a started server, a trained run) are built once. TEST_WORKERS=0 runs them in this process, one after another, with torch's own thread count.
workers="${TEST_WORKERS:-$(nproc)}"
if [ "$workers" -gt 8 ]; then workers=8; fi
if [ "$workers" -le 1 ]; then
    python -m pytest --durations=15 "$@"  # the slowest tests, to keep the suite under 10 minutes
else
    OMP_NUM_THREADS=1 python -m pytest -n "$workers" --dist loadfile --durations=15 "$@"
fi
