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
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${COMPO_TORCH:-torch==2.13.0} (CPU wheel)"
  "$VPY" -m pip install -q "${COMPO_TORCH:-torch==2.13.0}"
fi
echo "setup: installing compo and its dependencies"
"$VPY" -m pip install -q -e ".[dev]"
"$VPY" -c "import torch, transformers, compo; print(f'setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, compo {compo.__version__})')"
