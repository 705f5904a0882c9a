#!/bin/bash
# The launch shared by slurm/padd_*.sbatch: one srun step that starts train.py once per GPU
# of the allocation. train.py maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / the tasks
# per node / the first host of the node list to RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE and
# MASTER_ADDR itself (padd_ds/launch/roles.py); the last topology.teacher_ranks ranks (the
# last node(s)) become teachers, the others students. Nothing here needs the GPU count:
# the allocation's --ntasks-per-node decides it.
#
# Environment (the sbatch scripts set the first one; every variable can be overridden at
# submission, e.g. `PADD_EXTRA_ARGS="--set train.steps=50" sbatch slurm/padd_7b.sbatch`):
#   PADD_RECIPE       the recipe YAML (required)
#   PADD_DEEPSPEED    a DeepSpeed JSON overriding the recipe's deepspeed.config
#   PADD_EXTRA_ARGS   more `--set key=value` overrides, split on whitespace
#   PADD_RUN_DIR      run.output_dir (default runs/<job name>-<job id>: stable across requeues)
#   PADD_PYTHON       interpreter (default: the checkout's .venv/bin/python, else python3)
#   PADD_MASTER_PORT  rendezvous port (default 20000 + job id % 20000); +1 and +2 are used too
#   PADD_GPU_MEM_GB   GPU memory for the pre-flight plan (default: measured on this node)
#   PADD_RESUME       train.resume (default auto)
#
# Preemption and time limits - the contract with the trainer:
#   * SLURM sends SIGUSR1 to this batch shell --signal=B:USR1@<s> seconds before the time
#     limit. We forward it to the srun step, which forwards it to every train.py.
#   * train.py, on SIGUSR1: save a DeepSpeed checkpoint under <run dir>/checkpoints (all
#     ranks take part) and exit 0. On SIGTERM (preemption, scancel), the same if time allows.
#   * When the step has ended after a SIGUSR1 and the run has not finished (no results.json),
#     this script requeues the job (`scontrol requeue $SLURM_JOB_ID`, needs `#SBATCH
#     --requeue`). The requeued job keeps its id, hence its run directory.
#   * On start, train.py gets `--set train.resume=auto` (PADD_RESUME=never to start over):
#     it continues from the newest complete checkpoint in <run dir>/checkpoints, or starts
#     fresh when there is none. W&B continues the same run: WANDB_RUN_ID is fixed per job,
#     WANDB_RESUME=allow.
set -euo pipefail

log() { echo "[padd launch $(date +%H:%M:%S)] $*"; }
die() { echo "[padd launch] error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_NTASKS:-} ]] \
  || die "SLURM_JOB_ID/SLURM_NTASKS are not set: submit with sbatch (the allocation needs --ntasks-per-node)"
[[ -n ${PADD_RECIPE:-} ]] || die "PADD_RECIPE is not set; the sbatch script names the recipe"
REPO=${PADD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $REPO/train.py ]] || die "no train.py in $REPO: run sbatch from the padd-ds checkout or set PADD_REPO"
cd "$REPO"
[[ -f $PADD_RECIPE ]] || die "recipe $PADD_RECIPE not found (relative to $REPO)"

if [[ -n ${PADD_PYTHON:-} ]]; then
  PY=$PADD_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then
  PY=$REPO/.venv/bin/python
else
  PY=python3
fi

JOB_NAME=${SLURM_JOB_NAME:-padd}
RUN_DIR=${PADD_RUN_DIR:-$REPO/runs/$JOB_NAME-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR"

# Rendezvous: students on MASTER_PORT, teachers on +1, the teacher<->student bridge on +2.
# The job id keeps two jobs that share a node off each other's ports.
export MASTER_PORT=${PADD_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# train.py must see SLURM's variables, not a stale torchrun/deepspeed world.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE MASTER_ADDR
# NCCL: a failed or hung collective ends the job (and frees the nodes) instead of hanging it;
# warnings only in the log. Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric if needed.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# CPU threads per rank: what the allocation gave each task.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
# W&B: one run per job, continued after a requeue; files live in the run directory.
export WANDB_RUN_ID=${WANDB_RUN_ID:-$JOB_NAME-$SLURM_JOB_ID}
export WANDB_RESUME=${WANDB_RESUME:-allow}
export WANDB_DIR=${WANDB_DIR:-$RUN_DIR}
if [[ -z ${TORCH_EXTENSIONS_DIR:-} && -d $REPO/.venv ]]; then
  export TORCH_EXTENSIONS_DIR=$REPO/.venv/torch_extensions  # DeepSpeed ops built for this venv
fi

ARGS=(--recipe "$PADD_RECIPE" --set "run.output_dir=$RUN_DIR")
[[ -n ${PADD_DEEPSPEED:-} ]] && ARGS+=(--deepspeed "$PADD_DEEPSPEED")
read -r -a EXTRA <<< "${PADD_EXTRA_ARGS:-}"
ARGS+=("${EXTRA[@]}")

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES:-?} nodes, $SLURM_NTASKS tasks" \
    "(${SLURM_TASKS_PER_NODE:-?} per node), recipe $PADD_RECIPE, run dir $RUN_DIR, port $MASTER_PORT"

# Resume (train.resume=auto): continue from the newest complete checkpoint in the run dir.
if "$PY" -c 'import dataclasses, sys; from padd_ds.config import TrainConfig
sys.exit("resume" not in {f.name for f in dataclasses.fields(TrainConfig)})' 2>/dev/null; then
  ARGS+=(--set "train.resume=${PADD_RESUME:-auto}")
  if [[ -f $RUN_DIR/checkpoints/latest ]]; then
    log "a checkpoint exists (latest: $(cat "$RUN_DIR/checkpoints/latest")); train.resume=${PADD_RESUME:-auto}"
  fi
else
  log "note: this padd-ds has no train.resume yet; the run starts from the beginning"
fi

# Pre-flight: the memory plan for this allocation (train.py checks it again on every rank).
PLAN_ARGS=(--slurm)
[[ -n ${PADD_GPU_MEM_GB:-} ]] && PLAN_ARGS+=(--gpu-mem-gb "$PADD_GPU_MEM_GB")
set +e
"$PY" -m padd_ds.cli plan "${ARGS[@]}" "${PLAN_ARGS[@]}" > "$RUN_DIR/plan.txt" 2>&1
plan_rc=$?
set -e
cat "$RUN_DIR/plan.txt"
if (( plan_rc != 0 )); then
  log "the plan refuses this allocation (see above and $RUN_DIR/plan.txt); not starting"
  exit "$plan_rc"
fi

REQUEUE=0
SRUN_PID=
# shellcheck disable=SC2329  # invoked by the trap below
on_usr1() {
  log "SIGUSR1: time limit near; asking every rank to checkpoint and exit, then requeueing"
  REQUEUE=1
  if [[ -n $SRUN_PID ]]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
# shellcheck disable=SC2329  # invoked by the trap below
on_term() {
  log "SIGTERM (preemption or scancel): asking every rank to checkpoint"
  if [[ -n $SRUN_PID ]]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
trap on_usr1 USR1
trap on_term TERM

# In the background so that this shell can take signals while the step runs.
srun --kill-on-bad-exit=1 --ntasks="$SLURM_NTASKS" "$PY" "$REPO/train.py" "${ARGS[@]}" &
SRUN_PID=$!
RC=
while [[ -z $RC ]]; do
  status=0
  wait "$SRUN_PID" || status=$?
  # A trapped signal interrupts `wait` (status > 128) while the step runs on: wait again.
  if (( status > 128 )) && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  RC=$status
done
log "srun step ended with status $RC"

if (( REQUEUE )); then
  if [[ -f $RUN_DIR/results.json ]]; then
    log "the run finished before the time limit; not requeueing"
    exit 0
  fi
  log "requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$RC"
