#!/usr/bin/env bash
# Create .venv (if needed) and install compo into it, with the CPU torch wheel first when no
# torch is installed (an unpinned torch would pull the multi-GB CUDA build).
# GPU users: install your torch build into .venv first (see README); this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
LOG=.venv/setup.log  # pip's own chatter goes here; shown only when an install fails
: > "$LOG"
pip_install() {
  if ! "$VPY" -m pip install -q "$@" >>"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    echo "setup: pip install $* failed (full log: $LOG)" >&2
    exit 1
  fi
}
"$VPY" -m pip install -q --upgrade pip >>"$LOG" 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${COMPO_TORCH:-torch==2.13.0} (CPU wheel)"
  pip_install "${COMPO_TORCH:-torch==2.13.0}"
fi
echo "setup: installing compo and its dependencies (pip log: $LOG)"
pip_install -e ".[dev]"
"$VPY" -c "import torch, transformers, compo; print(f'setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, compo {compo.__version__})')"
