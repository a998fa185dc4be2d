#!/usr/bin/env bash
# torchrun, one invocation per node (static rendezvous: node 0 is the master).
#
#   launch/torchrun.sh train --config run.yaml                           # one node
#   HP_NNODES=4 HP_NODE_RANK=$i MASTER_ADDR=node0 launch/torchrun.sh train ...   # on node i
#
# Every argument goes to `python -m $HP_MODULE`. Environment:
#   HP_NPROC_PER_NODE  ranks per node (default gpu: one per visible GPU)
#   HP_NNODES          nodes (default 1)
#   HP_NODE_RANK       this node's index (default 0)
#   MASTER_ADDR        node 0's address (default 127.0.0.1)
#   MASTER_PORT        rendezvous port (default 29500)
#   HP_MODULE          module each rank runs (default hp_deepspeed.cli)
#   HP_LAUNCHER_ARGS   extra torchrun options
set -euo pipefail
source "$(dirname "$0")/preflight.sh" "$@"
# shellcheck disable=SC2086  # HP_LAUNCHER_ARGS is a list of options
exec "${PYTHON:-python}" -m hp_deepspeed.launching.supervise -- torchrun ${HP_LAUNCHER_ARGS:-} --nnodes "${HP_NNODES:-1}" \
  --nproc_per_node "${HP_NPROC_PER_NODE:-gpu}" --node_rank "${HP_NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m "${HP_MODULE:-hp_deepspeed.cli}" "$@"
