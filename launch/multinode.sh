#!/usr/bin/env bash
# Many nodes from a hostfile through the deepspeed launcher and one of its runners.
#
#   HP_HOSTFILE=hosts HP_LAUNCHER=pdsh launch/multinode.sh train --config run.yaml --resume auto
#   HP_HOSTFILE=hosts HP_LAUNCHER=openmpi HP_MPIRUN_ARGS="-x NCCL_DEBUG=INFO" \
#     launch/multinode.sh train --config run.yaml --resume auto
#
# The hostfile has one line per node, `hostname slots=GPUS`. Runners:
#   pdsh     ssh to every host (passwordless ssh needed; ssh options such as a key go in
#            PDSH_SSH_ARGS_APPEND, a port in HP_LAUNCHER_ARGS="--ssh_port N"), one deepspeed
#            launcher per node; PYTHON* variables and .deepspeed_env are exported to the hosts
#   openmpi  Open MPI's mpirun (`ompi_info` on PATH) starts every rank; each finds its rank
#            through mpi4py (hp_deepspeed.launching.distributed picks mpi4py's Open MPI ABI).
#            deepspeed does not pass the master address to these ranks, so this script does
#            (`-x MASTER_ADDR -x MASTER_PORT`); ranks are not bound to cores unless
#            HP_MPIRUN_ARGS says --bind-to (see openmpi_binding in preflight.sh)
#   mpich    MPICH/Hydra mpirun -ppn; ranks from PMI_RANK / MPI_LOCALRANKID
# Every argument goes to `python -m $HP_MODULE`. Environment:
#   HP_HOSTFILE        the hostfile (required)
#   HP_LAUNCHER        pdsh (default), openmpi or mpich
#   HP_MODULE          module each rank runs (default hp_deepspeed.cli)
#   MASTER_ADDR        rank 0's address (default: the first host of the hostfile)
#   MASTER_PORT        rendezvous port (default 29500)
#   HP_MPIRUN_ARGS     extra mpirun options for the openmpi and mpich runners, e.g.
#                      "-x NCCL_DEBUG=INFO --mca btl_tcp_if_include ib0" (deepspeed's openmpi
#                      runner adds `--mca btl_tcp_if_include eth0` unless this names that option)
#   HP_LAUNCHER_ARGS   extra deepspeed options, e.g. "--force_multi --no_ssh_check" for a
#                      one-host hostfile (mpirun options go in HP_MPIRUN_ARGS, not here), or
#                      "--log_level info" for the launchers' info lines (left out by default)
#   HP_SOCKET_IFNAME   the interface between the nodes, for gloo and NCCL (see README,
#                      "Multi-node"); with openmpi it and GLOO_/NCCL_SOCKET_IFNAME and
#                      HP_DIST_TIMEOUT are passed to the ranks with -x. The pdsh runner passes
#                      only NCCL_*/PYTHON* variables: put others in .deepspeed_env
#   HP_STOP_TIMEOUT    seconds a save-and-stop may take after SIGINT/SIGTERM (default 300)
#
# SIGINT or SIGTERM to this script saves a checkpoint on every rank of every node and stops (exit
# 75); a second one stops at once. The supervisor (hp_deepspeed/launching/supervise.py) reaches
# the hosts over pdsh itself, with PDSH_SSH_ARGS_APPEND, since an ssh session carries no signal
# to the remote side: with every runner when pdsh is on PATH (the run's tag reaches the ranks
# as PYTHON_HP_RUN: pdsh exports PYTHON* variables, Open MPI gets -x, MPICH's mpiexec passes its
# whole environment). Without pdsh, only the ranks on this host are signalled for openmpi and
# mpich; a rank whose launcher has gone saves and stops by itself in any case.
set -euo pipefail
source "$(dirname "$0")/preflight.sh" "$@"
hostfile=${HP_HOSTFILE:?set HP_HOSTFILE to a hostfile of \"host slots=N\" lines}
launcher=${HP_LAUNCHER:-pdsh}
module=${HP_MODULE:-hp_deepspeed.cli}
master_addr=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")}
master_port=${MASTER_PORT:-29500}
# Shell-quoted words, so that an option value with spaces survives as one argument.
eval "extra=(${HP_LAUNCHER_ARGS:-})"
for word in "${extra[@]}"; do
  if [ "$word" = --launcher_args ]; then
    echo "multinode.sh: put mpirun options in HP_MPIRUN_ARGS, not --launcher_args in HP_LAUNCHER_ARGS" >&2
    exit 2
  fi
done
args=(--hostfile "$hostfile" --launcher "$launcher" --master_addr "$master_addr"
      --master_port "$master_port" --no_local_rank)
mpirun_args=${HP_MPIRUN_ARGS:-}
if [ "$launcher" = openmpi ]; then
  mpirun_args="-x MASTER_ADDR=$master_addr -x MASTER_PORT=$master_port $(openmpi_binding "$mpirun_args") $mpirun_args"
  # Open MPI's remote ranks see only the variables named with -x.
  for var in HP_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME HP_DIST_TIMEOUT; do
    [ -n "${!var:-}" ] && mpirun_args="-x $var $mpirun_args"
  done
  # The run's tag, set by the supervisor, by which it finds the ranks on each host.
  if command -v pdsh > /dev/null; then mpirun_args="-x PYTHON_HP_RUN -x PYTHON_HP_RUN_NODES $mpirun_args"; fi
fi
if [ -n "$mpirun_args" ]; then
  args+=(--launcher_args "$mpirun_args")
fi
if [ "$launcher" = mpich ]; then
  # deepspeed's mpich runner cannot run a module (-m); give it a file that does.
  program=("$(python -c 'import hp_deepspeed.launching.entry as e; print(e.__file__)')" "$module")
else
  program=(--module "$module")
fi
supervise=("${PYTHON:-python}" -m hp_deepspeed.launching.supervise --module "$module")
if [ "$launcher" = pdsh ] || command -v pdsh > /dev/null; then
  supervise+=(--hostfile "$hostfile")
fi
# The launchers' info lines (their commands, the ranks' pids, a CUDA_VISIBLE_DEVICES set even on
# a CPU node) say nothing to a person: the runner's go with --log_level warning; the per-node
# launcher of the pdsh runner does not get that option (hp_deepspeed/compat/deepspeed.py), so
# the supervisor leaves its info lines out. A --log_level in HP_LAUNCHER_ARGS keeps them all.
quiet=(--log_level warning)
for word in "${extra[@]}"; do
  case "$word" in --log_level | --log_level=* | -q | --quiet) quiet=() ;; esac
done
if [ ${#quiet[@]} -gt 0 ]; then
  supervise+=(--drop-node-launcher-info)
fi
exec "${supervise[@]}" -- deepspeed "${quiet[@]}" "${extra[@]}" "${args[@]}" "${program[@]}" "$@"
