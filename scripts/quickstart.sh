#!/usr/bin/env bash
# Set up, then run the whole pipeline on the embedded default (tiny model + generated data; no download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/compo pipeline --config configs/quickstart.yaml "$@"
