# Shared by slurm/*.sbatch: environment, rendezvous, launching, preemption and requeue.
# Sourced from the batch script, which runs in $HP_REPO (default: the directory sbatch was
# called from). Every variable is described in slurm/README.md.

hp_log() { echo "[hp-slurm $(date -u +%H:%M:%S)] $*"; }

# Load the site environment, work out the job's shape and the rendezvous point.
hp_setup() {
  # From here on USR1 never kills the batch shell (see hp_on_signal).
  HP_SIGNALLED=0
  trap 'hp_on_signal USR1' USR1
  HP_REPO=${HP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$HP_REPO" || { echo "cannot cd to HP_REPO=$HP_REPO" >&2; exit 1; }
  local env_file=${HP_ENV_FILE:-slurm/env.sh}
  if [ -f "$env_file" ]; then
    hp_log "sourcing $env_file"
    # shellcheck disable=SC1090
    source "$env_file"
  elif [ -n "${HP_ENV_FILE:-}" ]; then
    echo "HP_ENV_FILE=$HP_ENV_FILE does not exist" >&2; exit 1
  fi
  PYTHON=${PYTHON:-python}
  HP_MODULE=${HP_MODULE:-hp_deepspeed.cli}
  HP_LAUNCH_MODE=${HP_LAUNCH_MODE:-task}
  HP_NNODES=${SLURM_JOB_NUM_NODES:?not inside a SLURM job}
  # Ranks per node: the GPUs SLURM gave each node, or the tasks per node in CPU mode.
  if [ "${HP_DEVICE:-cuda}" = cpu ]; then
    export HP_DEVICE=cpu
    HP_PER_NODE=${HP_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-$HP_NNODES} / HP_NNODES ))}}
  else
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    HP_PER_NODE=${HP_PER_NODE:-${gpus##*:}}   # "a100:8" -> 8
  fi
  if ! [[ "${HP_PER_NODE:-}" =~ ^[1-9][0-9]*$ ]]; then
    echo "cannot tell ranks per node (got '${HP_PER_NODE:-}'): request GPUs (--gpus-per-node)," \
         "or set HP_DEVICE=cpu with --ntasks-per-node, or set HP_PER_NODE" >&2
    exit 1
  fi
  # Rank 0 runs on the first node of the allocation; the port follows from the job id so
  # concurrent jobs on shared nodes do not collide (same rule as launching/environment.py).
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  MASTER_PORT=${MASTER_PORT:-$(( 15000 + SLURM_JOB_ID % 20000 ))}
  export MASTER_ADDR MASTER_PORT HP_MODULE
  HP_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
  hp_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) SLURM_RESTART_COUNT=$HP_RESTART_COUNT" \
         "nodes=$HP_NNODES ranks/node=$HP_PER_NODE device=${HP_DEVICE:-cuda}" \
         "mode=$HP_LAUNCH_MODE master=$MASTER_ADDR:$MASTER_PORT"
}

# The batch shell receives USR1 (--signal=B:USR1@T, or scancel --signal=USR1 --batch): pass it
# to the training step, which checkpoints at the next step boundary and exits 75. TERM is not
# trapped: on scancel or the time limit SLURM sends TERM to every process, the ranks checkpoint
# (within KillWait) and the job ends without being requeued.
hp_on_signal() {
  hp_log "caught SIG$1: asking the training step to checkpoint and stop"
  HP_SIGNALLED=1
  [ -n "${HP_STEP_PID:-}" ] && kill -s "$1" "$HP_STEP_PID" 2>/dev/null
}

# hp_run SUBCOMMAND ARGS...: run `python -m $HP_MODULE SUBCOMMAND ARGS...` on every rank, then
# requeue the job if it exited 75 (checkpoint written, not finished). Returns its exit code.
hp_run() {
  local cmd=("$PYTHON" -u -m "$HP_MODULE" "$@") step
  # Ranks stop together (exit 0, or 75 after a checkpoint). Once one task has ended, srun gives
  # the others HP_EXIT_WAIT seconds, then kills them: a crashed rank never leaves the rest
  # hanging in a collective until the time limit, and a rank still finishing its checkpoint
  # is not killed (--kill-on-bad-exit would kill it, and turn the step's 75 into 143).
  HP_EXIT_WAIT=${HP_EXIT_WAIT:-120}
  # Since SLURM 22.05 srun does not inherit --cpus-per-task from sbatch: pass it on.
  local cpus=(${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"})
  case "$HP_LAUNCH_MODE" in
    task)
      # One task per GPU; each rank reads SLURM_PROCID/SLURM_LOCALID (init_distributed).
      step=(srun --nodes="$HP_NNODES" --ntasks-per-node="$HP_PER_NODE"
            --ntasks=$(( HP_NNODES * HP_PER_NODE )) "${cpus[@]}" --kill-on-bad-exit=0 --wait="$HP_EXIT_WAIT" "${cmd[@]}")
      ;;
    node)
      # One launcher per node; it starts HP_PER_NODE ranks with RANK/LOCAL_RANK set. The
      # launcher ignores USR1 (it would die of it); its ranks get the signal from slurmstepd,
      # which signals every process of the step. deepspeed's launcher exits with its failing
      # rank's code, so 75 reaches this script; torchrun turns any rank's non-zero exit into 1,
      # so with torchrun a preempted job is not requeued automatically.
      local launcher
      case "${HP_NODE_LAUNCHER:-deepspeed}" in
        torchrun)
          launcher=(torchrun --nnodes="$HP_NNODES" --nproc_per_node="$HP_PER_NODE"
                    --node_rank='$SLURM_NODEID' --master_addr="$MASTER_ADDR"
                    --master_port="$MASTER_PORT" -m "$HP_MODULE") ;;
        deepspeed)
          local hostfile="${HP_RUN_DIR:-.}/hostfile-${SLURM_JOB_ID}"
          mkdir -p "$(dirname "$hostfile")"
          scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$HP_PER_NODE/" > "$hostfile"
          launcher=(deepspeed --hostfile="$hostfile" --no_ssh --no_local_rank --node_rank='$SLURM_NODEID'
                    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --module "$HP_MODULE") ;;
        *) echo "HP_NODE_LAUNCHER must be torchrun or deepspeed" >&2; return 1 ;;
      esac
      # $SLURM_NODEID is expanded on each node by the inner shell, the rest is quoted here.
      local quoted
      quoted=$(printf '%q ' "${launcher[@]}" "${@}")
      quoted=${quoted//\\\$SLURM_NODEID/\$SLURM_NODEID}
      step=(srun --nodes="$HP_NNODES" --ntasks-per-node=1 --ntasks="$HP_NNODES"
            "${cpus[@]}" --kill-on-bad-exit=0 --wait="$HP_EXIT_WAIT" bash -c "trap '' USR1; exec $quoted")
      ;;
    *) echo "HP_LAUNCH_MODE must be task or node" >&2; return 1 ;;
  esac
  if [ "$HP_MODULE" = hp_deepspeed.cli ] && [[ "$1" == train || "$1" == eval ]]; then
    # Reject a typo'd key or a wrong type here, in one process, before any rank is started.
    "$PYTHON" -m hp_deepspeed.cli validate --as "$1" "${@:2}" > /dev/null || return 2
  fi
  if [ "$HP_SIGNALLED" = 1 ]; then
    # Told to stop before training even started: go back to the queue right away.
    hp_log "signalled before the step started: scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60
    return 75
  fi
  # Under the supervisor, SIGINT or SIGTERM to the step's top process (a person's or a wrapper's
  # `kill`) becomes USR1 to srun, which slurmstepd delivers to every rank on every node: they save
  # and stop. Sent to srun itself they would kill the step without a save (SLURM's srun).
  step=("$PYTHON" -m hp_deepspeed.launching.supervise --module "$HP_MODULE" --launcher-forwards USR1 -- "${step[@]}")
  hp_log "running: ${step[*]}"
  "${step[@]}" &
  HP_STEP_PID=$!
  local rc
  # `wait` returns early (rc > 128) whenever a trapped signal arrives; keep waiting until the
  # step has really ended, then collect its own exit code.
  while :; do
    wait "$HP_STEP_PID"; rc=$?
    kill -0 "$HP_STEP_PID" 2>/dev/null || break
  done
  if [ "$rc" -gt 128 ]; then
    wait "$HP_STEP_PID" 2>/dev/null; local again=$?
    [ "$again" -ne 127 ] && rc=$again
  fi
  trap - USR1
  HP_STEP_PID=
  hp_log "training step exited with $rc (signalled=$HP_SIGNALLED)"
  if [ "$rc" -eq 75 ]; then
    local max=${HP_MAX_RESTARTS:-100}
    if [ "$HP_RESTART_COUNT" -ge "$max" ]; then
      hp_log "checkpoint written but restart $HP_RESTART_COUNT reached HP_MAX_RESTARTS=$max: not requeueing"
      return 75
    fi
    hp_log "checkpoint written, not finished: scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    # The requeue ends this batch script; should it not, exit with the preemption code.
    sleep 60
  fi
  return "$rc"
}
