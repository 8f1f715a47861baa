#!/usr/bin/env bash
# Issue 25's noise study (configs/hh_rlhf_noise_study.yaml) on one CUDA GPU, scaled up, in one call:
# 3 seeds instead of 2, rDPO and KTO / BCO on the clean pairs beside the study's five methods,
# stage 2 with m 1600 instead of 400, and 32 pairs per scoring batch. The study config itself is
# unchanged (model.device: auto picks the GPU); the scale-up is a generated copy under $OUT.
#
#   bash scripts/gpu_study.sh                    # on the GPU machine; results under $OUT
#
# Without a CUDA device it prints one line and exits 1. It stops at DEADLINE seconds (default 450,
# under 8 minutes with the start): `compo study` resumes, so running it again with the same OUT
# continues where it stopped. Files: $OUT/study/ (cells, runs, study.csv, study.md, plots),
# $OUT/study.log, and the summary lines on stdout.
#
# Model: .models/smollm2-135m (python scripts/get_smollm2.py). On a machine that cannot get it
# (the device tool carries at most 64 MiB, see docs/gpu_check.md), MODEL=random builds a
# random-weight model of SmolLM2's shape from .gpu/smollm2 (scripts/gpu_bundle.sh): its timings are
# SmolLM2's, its accuracies mean nothing. Data: ../shared/data, else .gpu/data.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/gpu_study}"
DEADLINE="${DEADLINE:-450}"
MODEL="${MODEL:-.models/smollm2-135m}"
CHECK_ONLY="${CHECK_ONLY:-0}"  # 1: only build and validate the scaled-up study config (any machine)
if [ "$CHECK_ONLY" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_study: no CUDA device on this machine (torch.cuda.is_available() is False): nothing was run"
  exit 1
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -d .gpu/whl ]; then  # compo's own dependencies, where the machine lacks them and cannot download
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_study_site .gpu/whl/*.whl \
    > "$OUT/pip.log" 2>&1 && export PYTHONPATH="/tmp/gpu_study_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
if [ "$MODEL" = random ] && [ "$CHECK_ONLY" != 1 ]; then
  MODEL=/tmp/gpu_study_smollm2
  "$PY" scripts/random_model.py .gpu/smollm2 "$MODEL" > /dev/null || { echo "gpu_study: no .gpu/smollm2 (run scripts/gpu_bundle.sh)"; exit 2; }
fi
[ -f "$MODEL/config.json" ] || [ "$CHECK_ONLY" = 1 ] || { echo "gpu_study: no model at $MODEL (python scripts/get_smollm2.py, or MODEL=random)"; exit 2; }
DATA=../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
[ -f "$DATA" ] || DATA=.gpu/data/hh-rlhf-harmless-base-test.jsonl.gz
[ -f "$DATA" ] || [ "$CHECK_ONLY" = 1 ] || { echo "gpu_study: hh-rlhf pairs not found in ../shared/data or .gpu/data"; exit 2; }
"$PY" - "$OUT" "$MODEL" "$DATA" <<'EOF'
import sys
from pathlib import Path

import yaml

out, model, data = sys.argv[1:]
spec = yaml.safe_load(Path("configs/hh_rlhf_noise_study.yaml").read_text())
spec["base"] = str(Path("configs", spec["base"]).resolve())
spec["study_dir"] = str(Path(out, "study"))
spec["seeds"] = [0, 1, 2]
spec["methods"].update({"rdpo": {}, "kto_clean": {}, "bco_clean": {}})
spec["overrides"].update({"model.path": str(Path(model).resolve()), "data.path": str(Path(data).resolve()),
                          "split.batch_size": 32, "zo.m": 1600})
Path(out, "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
EOF
if [ "$CHECK_ONLY" = 1 ]; then
  "$PY" -c "import sys; from compo.research.study import load_study; s, c = load_study(sys.argv[1]); print(f'gpu_study: config ok, {len(c)} cells ({len(s.seeds)} seeds x {len(s.settings())} noise settings x {len(s.methods)} methods)')" "$OUT/study.yaml"
  exit $?
fi
t0=$(date +%s)
timeout "$DEADLINE" "$PY" -m compo.cli study --config "$OUT/study.yaml" > "$OUT/study.log" 2>&1
rc=$?
cells=$(ls "$OUT/study/cells" 2>/dev/null | wc -l)
grep -E "^study: cell|compo study|^  " "$OUT/study.log" | tail -n 40
if [ "$rc" = 124 ]; then
  echo "gpu_study: stopped at the ${DEADLINE}s deadline with $cells cells done in $(( $(date +%s) - t0 ))s; run it again (same OUT) to resume"
elif [ "$rc" = 0 ]; then
  echo "gpu_study: all $cells cells done in $(( $(date +%s) - t0 ))s; $OUT/study/study.md"
else
  echo "gpu_study: compo study failed (exit $rc) after $cells cells; the end of $OUT/study.log:"
  tail -n 5 "$OUT/study.log"
fi
exit "$rc"
