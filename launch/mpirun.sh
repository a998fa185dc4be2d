#!/usr/bin/env bash
# Any MPI's mpirun; each rank finds its rank, size and local rank through mpi4py, and rank 0
# broadcasts the master address and a free port (hp_deepspeed.launching.distributed).
#
#   HP_NPROCS=16 HP_MPIRUN_ARGS="-f hosts -ppn 8" launch/mpirun.sh train --config run.yaml
#
# Every argument goes to `python -m $HP_MODULE`. Environment:
#   HP_NPROCS          total ranks (required)
#   HP_MPIRUN_ARGS     extra mpirun options: hosts and ranks per node, e.g. "-f hosts -ppn 8"
#                      (MPICH) or "--hostfile hosts --map-by ppr:8:node" (Open MPI; ranks
#                      are not bound to cores unless these say --bind-to, see preflight.sh)
#   HP_MODULE          module each rank runs (default hp_deepspeed.cli)
#   MPIRUN, PYTHON     the programs (default mpirun, python)
#   MASTER_ADDR/PORT   optional: override what rank 0 broadcasts
set -euo pipefail
source "$(dirname "$0")/preflight.sh" "$@"
nprocs=${HP_NPROCS:?set HP_NPROCS to the total number of ranks}
mpirun=${MPIRUN:-mpirun}
mpirun_args=${HP_MPIRUN_ARGS:-}
if "$mpirun" --version 2>&1 | grep -q "Open MPI"; then
  mpirun_args="$(openmpi_binding "$mpirun_args") $mpirun_args"
fi
# shellcheck disable=SC2086  # mpirun_args is a list of options
exec "${PYTHON:-python}" -m hp_deepspeed.launching.supervise -- "$mpirun" -n "$nprocs" $mpirun_args \
  "${PYTHON:-python}" -u -m "${HP_MODULE:-hp_deepspeed.cli}" "$@"
