#!/usr/bin/env bash
# compo on a SLURM allocation: one torchrun per node (srun), rendezvous on the allocation's first
# node, any compo command and options after the script name:
#
#   sbatch --nodes 3 --gpus-per-node 8 scripts/slurm_compo.sh pipeline -c my.yaml --run-dir runs/x
#   GPUS_PER_NODE=4 OMP_NUM_THREADS=4 sbatch --nodes 2 scripts/slurm_compo.sh zo -c my.yaml
#     (CPU nodes, gloo: delete the --gpus-per-node line below; GPUS_PER_NODE = processes per node)
#
# run_dir, the data and model.path must be on a file system every node reads (docs/scaling.md).
# A judge's sqlite cache (judge_options.cache_path) must be on a disk local to its node.
#SBATCH --job-name=compo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=compo-%j.out
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: sbatch [sbatch options] scripts/slurm_compo.sh <compo command> [options]" >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (run it with sbatch or salloc)}"

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
PYTHON=${COMPO_PYTHON:-.venv/bin/python}
export MASTER_ADDR MASTER_PORT

echo "compo: $NNODES node(s) x $PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT: compo $*"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$PER_NODE" \
    --rdzv_id "${SLURM_JOB_ID:-compo}" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    -m compo.cli "$@"
