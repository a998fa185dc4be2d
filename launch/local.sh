#!/usr/bin/env bash
# One node, all (or HP_NUM_GPUS) GPUs, through the deepspeed launcher.
#
#   launch/local.sh train --config configs/run.yaml --resume auto [key=value ...]
#
# Every argument goes to `python -m $HP_MODULE`; ranks get LOCAL_RANK from the environment, not
# a --local_rank argument (--no_local_rank). Environment:
#   HP_MODULE          module each rank runs (default hp_deepspeed.cli)
#   HP_NUM_GPUS        ranks to start (default: every visible GPU; set it on a CPU-only machine)
#   MASTER_PORT        rendezvous port (default 29500)
#   HP_LAUNCHER_ARGS   extra deepspeed launcher options, e.g. "--include localhost:0,1"
set -euo pipefail
source "$(dirname "$0")/preflight.sh" "$@"
args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank --module)
[ -n "${HP_NUM_GPUS:-}" ] && args=(--num_gpus "$HP_NUM_GPUS" "${args[@]}")
# shellcheck disable=SC2086  # HP_LAUNCHER_ARGS is a list of options
exec "${PYTHON:-python}" -m hp_deepspeed.launching.supervise -- deepspeed ${HP_LAUNCHER_ARGS:-} "${args[@]}" "${HP_MODULE:-hp_deepspeed.cli}" "$@"
