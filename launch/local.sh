#!/usr/bin/env bash
# One node, all (or HP_NUM_GPUS) GPUs, through the deepspeed launcher.
#
#   launch/local.sh train --config configs/run.yaml --resume auto [key=value ...]
#
# Every argument goes to `python -m $HP_MODULE`; ranks get LOCAL_RANK from the environment, not
# a --local_rank argument (--no_local_rank). Environment:
#   HP_MODULE          module each rank runs (default hp_deepspeed.cli)
#   HP_NUM_GPUS        ranks to start: one per GPU on a GPU machine, CPU processes on a machine
#                      without one (or with HP_DEVICE=cpu). Default: every visible GPU; without a
#                      GPU, 1 rank, and a line says so
#   HP_STOP_TIMEOUT    seconds a save-and-stop may take after SIGINT/SIGTERM (default 300)
#   MASTER_PORT        rendezvous port (default 29500)
#   HP_LAUNCHER_ARGS   extra deepspeed launcher options, e.g. "--include localhost:0,1", or
#                      "--log_level info" for the launcher's info lines
set -euo pipefail
source "$(dirname "$0")/preflight.sh" "$@"
args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank --module)
if [ -n "${HP_NUM_GPUS:-}" ]; then
  args=(--num_gpus "$HP_NUM_GPUS" "${args[@]}")
else
  gpus=0
  if [ "${DS_ACCELERATOR:-}" != cpu ] && command -v nvidia-smi > /dev/null; then
    gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
  fi
  if [ "$gpus" = 0 ]; then
    echo "local.sh: no GPU in use and HP_NUM_GPUS unset: starting 1 rank on the CPU (HP_NUM_GPUS=N starts N)" >&2
  fi
fi
# shellcheck disable=SC2086  # HP_LAUNCHER_ARGS is a list of options
# --log_level warning: the launcher's info lines (its command, the ranks' pids, a
# CUDA_VISIBLE_DEVICES it sets even on a CPU machine) say nothing to a person; the ranks' own
# logging is not affected. HP_LAUNCHER_ARGS="--log_level info" brings them back.
exec "${PYTHON:-python}" -m hp_deepspeed.launching.supervise -- deepspeed --log_level warning ${HP_LAUNCHER_ARGS:-} \
  "${args[@]}" "${HP_MODULE:-hp_deepspeed.cli}" "$@"
