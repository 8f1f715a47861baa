#!/usr/bin/env bash
# The GPU checks of issue 10 in one call, on a lent GPU machine (see docs/gpu_check.md): the CUDA
# test (Philox on the GPU, bit for bit against the CPU kernel), bench_zo on SmolLM2's shape (both
# random streams, bf16 matmul: perturbations/s and the head matmul against the bf16 peak) and
# stage-1 DPO against TRL's DPOTrainer. Needs .gpu/ from scripts/gpu_bundle.sh carried along.
# Every step is bounded by a timeout and writes under $OUT (default /tmp/gpu_check); a failing
# step is logged and the next one still runs. Exits 1 if any step failed. A dry run of the script
# itself on a CPU machine: QUICK=1 DEVICE=cpu NO_WHEELS=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
if [ "${QUICK:-0}" = 1 ]; then M=16 BATCH=2 STEPS=1; else M=1600 BATCH=8 STEPS=8; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .gpu/whl ] || { echo "gpu_check: .gpu/ missing: run scripts/gpu_bundle.sh here and carry .gpu" >&2; exit 2; }
if [ "${NO_WHEELS:-0}" != 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
failed=0
step() {  # step NAME SECONDS CMD...: run CMD with a timeout; stdout to $OUT/NAME.json, stderr to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "gpu_check: $name rc=$rc $((SECONDS - t0))s $(tail -c 600 "$OUT/$name.json")"
  [ $rc -eq 0 ] || { failed=1; tail -n 8 "$OUT/$name.log"; }
}
step env 60 "$PY" -c "import torch, transformers, numba, pydantic; print({'torch': torch.__version__, \
'transformers': transformers.__version__, 'numba': numba.__version__, \
'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None})"
step model 120 "$PY" scripts/random_model.py .gpu/smollm2 /tmp/smollm2
DATA=$(ls .gpu/data/*.jsonl.gz | head -n 1)
step cuda_test 180 "$PY" -m pytest -q -o addopts="" -p no:cacheprovider tests/test_philox.py -k cuda
ZO=("$PY" scripts/bench_zo.py --model /tmp/smollm2 --data "$DATA" --device "$DEVICE" --m "$M")
step zo_torch 240 "${ZO[@]}" --rng torch
step zo_philox 180 "${ZO[@]}" --rng philox --skip-reference
step zo_bf16 120 "${ZO[@]}" --matmul-dtype bfloat16 --skip-reference --skip-full
step trl 300 "$PY" scripts/bench_stage1.py --vs-trl --device "$DEVICE" --model /tmp/smollm2 --data "$DATA" \
  --batch "$BATCH" --steps "$STEPS" --max-length 256
exit $failed
