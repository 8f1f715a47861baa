#!/usr/bin/env bash
# The GPU checks of issue 10 in one call, on a lent GPU machine (see docs/gpu_check.md): the CUDA
# test (Philox on the GPU, bit for bit against the CPU kernel), bench_zo on SmolLM2's shape (both
# random streams, bf16 matmul: perturbations/s and the head matmul against the bf16 peak and the
# memory bandwidth) and stage-1 DPO against TRL's DPOTrainer. Needs .gpu/ from
# scripts/gpu_bundle.sh carried along.
#
# Steps run most important first (env, model, cuda_test, zo_torch, trl, zo_bf16, zo_philox), each
# bounded by its own timeout and by a global deadline: DEADLINE seconds (default 420) from the
# start; a step gets min(its limit, time left - 10 s) and one with under 20 s left is skipped. A
# failing step is logged and the next one still runs. Writes under $OUT (default /tmp/gpu_check):
#   results.jsonl  one line a step: {"step", "rc" (an int, or "skipped"), "seconds", "result"
#                  (the step's JSON stdout, parsed, or null)}
#   steps.log      every step's stderr (and stdout when it is not JSON) under a header line
#   pip.log        the wheels' install
# and prints one summary line a step (chosen keys) on stdout. Exits 1 if any step failed or was
# skipped. A dry run of the script itself on a CPU machine (the cuda_test step fails there):
#   QUICK=1 DEVICE=cpu NO_WHEELS=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DEADLINE="${DEADLINE:-420}"
if [ "${QUICK:-0}" = 1 ]; then M=16 BATCH=2 STEPS=1; else M=1600 BATCH=8 STEPS=8; fi
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
: > "$OUT/steps.log"
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=/tmp/hf
[ -d .gpu/whl ] || { echo "gpu_check: .gpu/ missing: run scripts/gpu_bundle.sh here and carry .gpu" >&2; exit 2; }

# record NAME RC SECONDS STDOUT_FILE KEY...: a line of results.jsonl and the summary line (KEY ALL: all keys)
cat > "$TMPD/record.py" <<'EOF'
import json
import os
import sys

name, rc, seconds, path, keys = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5:]
rc = rc if rc == "skipped" else int(rc)
text = open(path, errors="replace").read().strip() if path else ""
result = None
for cand in [text, *reversed(text.splitlines())]:  # the whole stdout, else its last JSON line
    try:
        obj = json.loads(cand)
    except ValueError:
        continue
    if isinstance(obj, dict):
        result = obj
        break
with open(os.environ["GPU_CHECK_OUT"] + "/results.jsonl", "a") as f:
    f.write(json.dumps({"step": name, "rc": rc, "seconds": round(seconds, 1), "result": result}) + "\n")
if result is None and text:
    with open(os.environ["GPU_CHECK_OUT"] + "/steps.log", "a") as f:
        f.write(f"--- {name}: stdout (not JSON) ---\n{text}\n")


def short(x):
    return float(f"{x:.4g}") if isinstance(x, float) else x


if result is None:
    picked = "result=null"
else:
    picked = json.dumps({k: short(v) for k, v in result.items() if "ALL" in keys or k in keys})
print(f"gpu_check: {name} rc={rc} {seconds:.0f}s {picked}", flush=True)
EOF
export GPU_CHECK_OUT="$OUT"

failed=() skipped=()
T0=$SECONDS
now_us() { if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME//[.,]/}"; else echo $(( $(date +%s) * 1000000 )); fi; }
since() { local us=$(( $(now_us) - $1 )); printf '%d.%d' $((us / 1000000)) $(( us / 100000 % 10 )); }  # since T0_US: seconds
record() {  # record NAME RC SECONDS STDOUT_FILE KEY...
  "$PY" "$TMPD/record.py" "$@" || {  # no usable python: a line without the result
    local rc=$2; [ "$rc" = skipped ] && rc='"skipped"'
    printf '{"step": "%s", "rc": %s, "seconds": %s, "result": null}\n' "$1" "$rc" "$3" >> "$OUT/results.jsonl"
    [ -n "$4" ] && { echo "--- $1: stdout ---"; cat "$4"; } >> "$OUT/steps.log"
    echo "gpu_check: $1 rc=$2 $3s (record.py failed)"
  }
}
step() {  # step NAME LIMIT KEYS CMD...: run CMD with min(LIMIT, time left - 10 s); KEYS: space-separated, for the summary
  local name=$1 limit=$2 keys=$3; shift 3
  local left=$((DEADLINE - (SECONDS - T0)))
  if [ "$left" -lt 20 ]; then
    skipped+=("$name")
    printf '=== %s: skipped, %ss left of DEADLINE=%s ===\n' "$name" "$left" "$DEADLINE" >> "$OUT/steps.log"
    record "$name" skipped 0 ""
    return
  fi
  local t=$(( limit < left - 10 ? limit : left - 10 ))
  local t0; t0=$(now_us)
  timeout -k 5 "$t" "$@" > "$TMPD/stdout" 2> "$TMPD/stderr"
  local rc=$?
  local dt; dt=$(since "$t0")
  case $rc in 124|137) echo "gpu_check: $name timed out after ${t}s (rc=$rc)" >> "$TMPD/stderr";; esac
  { printf '=== %s: rc=%s %ss (timeout %ss): %s ===\n' "$name" "$rc" "$dt" "$t" "$*"; cat "$TMPD/stderr"; } \
    >> "$OUT/steps.log"
  # shellcheck disable=SC2086
  record "$name" "$rc" "$dt" "$TMPD/stdout" $keys
  [ $rc -eq 0 ] || { failed+=("$name"); tail -c 800 "$TMPD/stderr"; }
}

if [ "${NO_WHEELS:-0}" != 1 ]; then  # a failure is logged; the steps then run on the machine's own packages
  t0=$(now_us)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    > "$OUT/pip.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    failed+=(pip)
    echo "gpu_check: pip install of .gpu/whl failed (rc=$rc); going on with the machine's own packages:"
    tail -5 "$OUT/pip.log"
  fi
  record pip "$rc" "$(since "$t0")" ""
fi

cat > "$TMPD/env.py" <<'EOF'
import importlib
import importlib.metadata
import json
import platform
import sys

out = {"python": sys.version.split()[0], "platform": platform.platform()}
missing, bundled = [], []
for name in ("torch", "transformers", "numba", "pydantic", "tenacity", "pyarrow", "fsspec", "typing_extensions",
             "huggingface_hub", "datasets", "trl"):
    try:
        mod = importlib.import_module(name)
        out[name] = getattr(mod, "__version__", None) or importlib.metadata.version(name)
        if (getattr(mod, "__file__", None) or "").startswith("/tmp/site/"):
            bundled.append(name)
    except Exception as e:  # one missing or broken package must not hide the others
        out[name] = f"error: {type(e).__name__}: {e}"[:300]
        missing.append(name)
out["from_bundle"] = bundled
try:
    import torch

    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_capability"] = f"{props.major}.{props.minor}"
        out["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        out["gpu_count"] = torch.cuda.device_count()
    else:
        out["gpu"] = None
except Exception as e:
    out["gpu"] = f"error: {type(e).__name__}: {e}"[:300]
out["failed_imports"] = missing
print(json.dumps(out))
sys.exit(1 if missing else 0)
EOF

# The CUDA test must run and pass: a skip (no usable CUDA device) fails the step.
cat > "$TMPD/cuda_test.sh" <<'EOF'
out=$("$1" -m pytest -rA -q -o addopts="" -p no:cacheprovider tests/test_philox.py -k cuda 2>&1); rc=$?
echo "$out" >&2
passed=$(echo "$out" | grep -Eo '[0-9]+ passed' | tail -n 1 | grep -Eo '[0-9]+')
nskip=$(echo "$out" | grep -Eo '[0-9]+ skipped' | tail -n 1 | grep -Eo '[0-9]+')
printf '{"pytest_rc": %s, "passed": %s, "skipped": %s, "summary": "%s"}\n' "$rc" "${passed:-0}" "${nskip:-0}" \
  "$(echo "$out" | tail -n 1 | tr -d '"\\')"
if [ "$rc" -ne 0 ]; then echo "cuda_test: FAILED: pytest exited $rc" >&2; exit 1; fi
if echo "$out" | grep -qi skipped; then
  echo "cuda_test: FAILED: the CUDA test was skipped (no usable CUDA device?); it must run and pass" >&2; exit 1
fi
if [ "${passed:-0}" -lt 1 ]; then echo "cuda_test: FAILED: no test passed" >&2; exit 1; fi
EOF

ZO_KEYS="projected_perturbations_per_s step_m${M}_projected_s step_m${M}_full_s compo_projected_s compo_full_s \
speedup_vs_reference projected_speedup_vs_reference head_matmul_bf16_tflops head_matmul_fraction_of_peak head_matmul_gbs \
head_matmul_fraction_of_bandwidth projected_step_fraction_of_peak vote_agreement_vs_float32 chunk_projected device"
TRL_KEYS="compo_pairs_per_s trl_pairs_per_s trl_noprecompute_pairs_per_s speedup_vs_trl compo_peak_gpu_mb \
trl_peak_gpu_mb trl_noprecompute_peak_gpu_mb"

step env 60 ALL "$PY" "$TMPD/env.py"
step model 120 "" "$PY" scripts/random_model.py .gpu/smollm2 /tmp/smollm2
DATA=$(ls .gpu/data/*.jsonl.gz | head -n 1)
step cuda_test 180 "pytest_rc passed skipped summary" bash "$TMPD/cuda_test.sh" "$PY"
ZO=("$PY" scripts/bench_zo.py --model /tmp/smollm2 --data "$DATA" --device "$DEVICE" --m "$M")
step zo_torch 240 "$ZO_KEYS" "${ZO[@]}" --rng torch
step trl 300 "$TRL_KEYS" "$PY" scripts/bench_stage1.py --vs-trl --device "$DEVICE" --model /tmp/smollm2 \
  --data "$DATA" --batch "$BATCH" --steps "$STEPS" --max-length 256
step zo_bf16 120 "$ZO_KEYS" "${ZO[@]}" --matmul-dtype bfloat16 --skip-reference --skip-full
step zo_philox 180 "$ZO_KEYS" "${ZO[@]}" --rng philox --skip-reference
echo "gpu_check: done in $((SECONDS - T0))s; failed: ${failed[*]:-none}; skipped: ${skipped[*]:-none}"
[ ${#failed[@]} -eq 0 ] && [ ${#skipped[@]} -eq 0 ]
