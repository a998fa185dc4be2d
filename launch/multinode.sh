#!/usr/bin/env bash
# Many nodes from a hostfile through the deepspeed launcher and one of its runners.
#
#   HP_HOSTFILE=hosts HP_LAUNCHER=pdsh launch/multinode.sh train --config run.yaml --resume auto
#
# The hostfile has one line per node, `hostname slots=GPUS`. Runners:
#   pdsh     ssh to every host (passwordless ssh needed; ssh options such as a key go in
#            PDSH_SSH_ARGS_APPEND, a port in HP_LAUNCHER_ARGS="--ssh_port N"), one deepspeed
#            launcher per node; PYTHON* variables and .deepspeed_env are exported to the hosts
#   openmpi  Open MPI's mpirun (`ompi_info` on PATH, mpi4py built against Open MPI); ranks
#            found by mpi4py in init_distributed
#   mpich    MPICH/Hydra mpirun -ppn; ranks from PMI_RANK / MPI_LOCALRANKID
# Every argument goes to `python -m $HP_MODULE`. Environment:
#   HP_HOSTFILE        the hostfile (required)
#   HP_LAUNCHER        pdsh (default), openmpi or mpich
#   HP_MODULE          module each rank runs (default hp_deepspeed.cli)
#   MASTER_ADDR        rank 0's address (default: the first host of the hostfile)
#   MASTER_PORT        rendezvous port (default 29500)
#   HP_LAUNCHER_ARGS   extra deepspeed options, e.g. "--force_multi --no_ssh_check" for a
#                      one-host hostfile, or "--launcher_args '-x NCCL_DEBUG'" for mpirun
set -euo pipefail
source "$(dirname "$0")/preflight.sh" "$@"
hostfile=${HP_HOSTFILE:?set HP_HOSTFILE to a hostfile of \"host slots=N\" lines}
launcher=${HP_LAUNCHER:-pdsh}
module=${HP_MODULE:-hp_deepspeed.cli}
master_addr=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")}
args=(--hostfile "$hostfile" --launcher "$launcher" --master_addr "$master_addr"
      --master_port "${MASTER_PORT:-29500}" --no_local_rank)
if [ "$launcher" = mpich ]; then
  # deepspeed's mpich runner cannot run a module (-m); give it a file that does.
  program=("$(python -c 'import hp_deepspeed.launching.entry as e; print(e.__file__)')" "$module")
else
  program=(--module "$module")
fi
# Shell-quoted words, so that --launcher_args '...' survives as one argument.
eval "extra=(${HP_LAUNCHER_ARGS:-})"
exec deepspeed "${extra[@]}" "${args[@]}" "${program[@]}" "$@"
