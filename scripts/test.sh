#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; GPU tests skip without a GPU).
# The browser human-judge tests need chromium and chromedriver: installed here with apt-get when
# missing and we are root (quietly, never failing the script); without them those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing chromium and chromium-driver for the browser judge tests"
  install_chromium() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }
  if ! install_chromium && ! { apt-get update -qq >/dev/null 2>&1 && install_chromium; }; then
    echo "test: could not install chromium (the browser judge tests will skip)"
  fi
fi
# Two pytest-xdist workers (one on a 1-core machine; COMPO_TEST_WORKERS=N overrides, 1 = no xdist).
# Most of the suite's time is `compo` runs in subprocesses and mp.spawn'd ranks, so a second worker
# nearly halves it on 2 cores; tests/conftest.py keeps every process at one torch thread.
# --dist loadfile: a file's tests run in one worker, so the runs a module or session fixture builds
# once (tests/test_bad_inputs.py's prepared runs, test_reliability.py's reference run) are built once;
# --no-loadscope-reorder: files in collection order, where tests/conftest.py puts the slowest first.
workers="${COMPO_TEST_WORKERS:-$(n="$(nproc 2>/dev/null || echo 2)"; echo $((n < 2 ? n : 2)))}"
xdist=()
if [ "$workers" -gt 1 ]; then
  xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
exec .venv/bin/python -m pytest tests ${xdist[@]+"${xdist[@]}"} "$@"
