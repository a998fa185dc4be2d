#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing slurm/*.sbatch (needs root).
#
#   scripts/slurm_local_cluster.sh start    install munge/slurm (apt) if missing, configure, start,
#                                           wait until the node is idle
#   scripts/slurm_local_cluster.sh stop     stop slurmd, slurmctld and munged started by `start`
#   scripts/slurm_local_cluster.sh status   exit 0 and print `sinfo` when the cluster answers
#
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
# The node is this host as `slurmd -C` sees it (CPUs, memory, name). Requeue is enabled
# (JobRequeue=1) and the scheduler polls quickly, so test jobs start within seconds.
#
# Environment:
#   HP_SLURM_DIR   state, spool, logs and pid files (default /tmp/hp-slurm)
#   SLURM_CONF     the slurm.conf to write (default /etc/slurm/slurm.conf). An existing file is
#                  overwritten only if this script wrote it (it carries a marker line), so a
#                  real site configuration is never replaced.
set -euo pipefail

STATE_DIR=${HP_SLURM_DIR:-/tmp/hp-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARKER="# written by hp-deepspeed scripts/slurm_local_cluster.sh"
export SLURM_CONF=$CONF

log() { echo "[slurm_local_cluster] $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

# daemon CMD...: start a daemon without the descriptors above stderr that this script inherited.
# A daemon keeps whatever it inherits for its life: started under `flock LOCK ...` it would hold
# the lock until it stops, and every later `flock LOCK` would wait for it.
daemon() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"
    done
    "$@"
  )
}

node_idle() { sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

# install [BINARY:PACKAGE ...]: apt-get install the packages of SLURM, munge and any BINARY that is
# missing (scripts/netns_cluster.sh adds sshd, pdsh and ip).
install() {
  local need=() pair
  for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client "$@"; do
    command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
  done
  [ ${#need[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || { log "need root to install ${need[*]}"; exit 2; }
  command -v apt-get >/dev/null || { log "no apt-get to install ${need[*]}"; exit 2; }
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

# The settings every local test cluster shares (this one and scripts/netns_cluster.sh).
common_conf() {
  cat <<'EOF'
# No cgroups in containers: track processes by parent pid, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
# Requeue: `scontrol requeue` and preemption put jobs back in the queue.
JobRequeue=1
# Fast tests: a requeued job may start again after cred_expire seconds (default 120), a short
# kill grace, finished jobs visible to scontrol for 10 minutes.
AuthInfo=cred_expire=10
KillWait=10
MinJobAge=600
ReturnToService=2
SlurmdTimeout=60
MpiDefault=none
EOF
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    log "$CONF exists and was not written by this script; set SLURM_CONF to another path"
    exit 2
  fi
  local node host
  node=$(slurmd -C | head -1)          # NodeName=... CPUs=... RealMemory=...
  host=$(hostname -s)
  mkdir -p "$(dirname "$CONF")" "$STATE_DIR"/{ctld,spool,log}
  cat > "$CONF.tmp" <<EOF
$MARKER
ClusterName=hplocal
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldPort=${HP_SLURMCTLD_PORT:-6817}
SlurmdPort=${HP_SLURMD_PORT:-6818}
$(common_conf)
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.tmp" "$CONF"
}

# A munged for the cluster's credentials, unless one already answers (its key made once).
start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    # Run as root with the key owned by root (no munge user needed); --force skips the
    # ownership checks that assume a dedicated munge user.
    chown root:root /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    daemon munged --force
    touch "$STATE_DIR/munged.ours"
  fi
}

start() {
  install
  if pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" && node_idle; then
    log "already running"; sinfo; return
  fi
  write_conf
  mkdir -p "$STATE_DIR"
  start_munge
  pid_alive "$STATE_DIR/slurmctld.pid" || daemon slurmctld -i
  pid_alive "$STATE_DIR/slurmd.pid" || daemon slurmd
  local i
  for i in $(seq 1 60); do
    if node_idle; then sinfo; return; fi
    # A node that was DOWN from an earlier run comes back on its own (ReturnToService=2),
    # but do not wait for the next ping.
    [ "$i" -eq 5 ] && scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true
    sleep 1
  done
  log "node did not become idle in 60s; logs in $STATE_DIR/log"
  sinfo -N -l >&2 || true
  tail -20 "$STATE_DIR"/log/*.log >&2 || true
  exit 1
}

stop_pidfile() {
  local file=$1 i
  pid_alive "$file" || return 0
  kill "$(cat "$file" 2>/dev/null)" 2>/dev/null || return 0
  for i in $(seq 1 50); do pid_alive "$file" || return 0; sleep 0.2; done
  kill -9 "$(cat "$file" 2>/dev/null)" 2>/dev/null || true
}

stop() {
  stop_pidfile "$STATE_DIR/slurmd.pid"
  stop_pidfile "$STATE_DIR/slurmctld.pid"
  if [ -f "$STATE_DIR/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$STATE_DIR/munged.ours"
  fi
  log "stopped"
}

status() {
  pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" && sinfo && node_idle
}

# Sourced (by scripts/netns_cluster.sh) only the functions are defined.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
