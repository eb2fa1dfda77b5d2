# Sourced by the megatron-stag batch scripts: rendezvous, environment, container and srun arguments.
# Inputs (exported by `megatron-stag submit`, or set by hand before sbatch):
#   STAG_RUN_DIR          per-job directory (logs, checkpoints); must be shared on multi-node jobs
#   STAG_PYTHON           interpreter with megatron-stag installed (default: python3)
#   STAG_CONTAINER_IMAGE  optional pyxis image (then STAG_CONTAINER_MOUNTS: src:dst[,src:dst])
#   STAG_SLURM_DIR        this folder (Slurm runs a copy of the batch script from its spool directory)

: "${STAG_RUN_DIR:?set STAG_RUN_DIR (megatron-stag submit does)}"
: "${STAG_PYTHON:=python3}"

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
export MASTER_ADDR MASTER_PORT
export CUDA_DEVICE_MAX_CONNECTIONS=1            # megatron's TP/SP communication overlap
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

srun_args=(--kill-on-bad-exit=1)
if [[ -n "${STAG_CONTAINER_IMAGE:-}" ]]; then
  srun_args+=("--container-image=${STAG_CONTAINER_IMAGE}" --container-workdir="$PWD")
  if [[ -n "${STAG_CONTAINER_MOUNTS:-}" ]]; then
    srun_args+=("--container-mounts=${STAG_CONTAINER_MOUNTS}")
  fi
fi

log() { echo "[megatron-stag $(date '+%F %T')] $*"; }

# Multi-node jobs: every node must see the run directory (checkpoints are written by several nodes
# and read back by all of them on resume).
check_shared_run_dir() {
  if (( SLURM_JOB_NUM_NODES > 1 )); then
    local marker="${STAG_RUN_DIR}/.shared-check-${SLURM_JOB_ID}"
    touch "$marker"
    # one task per node, stated in full: the job's own task count would otherwise apply (and warn)
    if ! srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 test -e "$marker"; then
      log "error: ${STAG_RUN_DIR} is not visible from every node: use a shared filesystem for the run directory"
      rm -f "$marker"
      exit 2
    fi
    rm -f "$marker"
  fi
}
