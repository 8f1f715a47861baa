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
exec .venv/bin/python -m pytest tests "$@"
