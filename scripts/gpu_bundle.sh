#!/usr/bin/env bash
# Gather, on this machine, what scripts/gpu_check.sh needs on a lent GPU machine that has PyTorch,
# transformers and numba but not compo's other dependencies and cannot download: wheels for
# Python 3.12 (pydantic, tenacity; datasets and trl for the TRL comparison), SmolLM2's config
# and tokenizer (not its weights: the check times a random-weight model of the same shape) and
# the hh-rlhf pairs. Writes .gpu/ (git-ignored, ~10 MB); carry it to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-.models/smollm2-135m}"
DATA="${2:-../shared/data/hh-rlhf-harmless-base-test.jsonl.gz}"
rm -rf .gpu && mkdir -p .gpu/whl .gpu/smollm2 .gpu/data
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$MODEL/$f" ] && cp "$MODEL/$f" .gpu/smollm2/
done
[ -f .gpu/smollm2/config.json ] || { echo "gpu_bundle: $MODEL/config.json not found (python scripts/get_smollm2.py)" >&2; exit 2; }
cp "$DATA" .gpu/data/
PLAT=()
for n in 28 27 17; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform any)
for pkg in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
           typing-extensions==4.16.0 tenacity==9.2.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d .gpu/whl "$pkg"
done
du -sh .gpu
