#!/usr/bin/env bash
# Set up, then run the embedded default (tiny model + generated data; no download): the quickstart
# pipeline (split -> DPO on clean pairs -> ComPO on noisy pairs) beside DPO on all pairs and DPO on
# the clean pairs alone, with held-out intervals and stage 2's own effect. Outputs: runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/compo study --config configs/quickstart_study.yaml "$@"
