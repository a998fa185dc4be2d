#!/usr/bin/env bash
# A multi-node cluster on this one machine (root): each node is a network namespace with its own
# address, running its own slurmd and sshd, all talking to one slurmctld on the host.
#
#   scripts/netns_cluster.sh up       install what is missing (apt: slurm, munge, openssh-server,
#                                     pdsh, iproute2), build the network, start the daemons, wait
#                                     until every node is idle in SLURM
#   scripts/netns_cluster.sh down     stop everything `up` started, kill what still runs in the
#                                     nodes, delete the namespaces, the bridge and the /etc/hosts lines
#   scripts/netns_cluster.sh status   exit 0 (and print `sinfo`) when every part is up and idle
#
# Idempotent: `up` on a running cluster checks it and repairs what is missing; `down` on a torn
# down one does nothing. After `up`, `source $HP_NETNS_DIR/env.sh` gives a shell SLURM_CONF and
# the ssh options of pdsh (PDSH_SSH_ARGS_APPEND) and Open MPI (OMPI_MCA_plm_rsh_args for 4,
# PRTE_MCA_plm_ssh_args for 5).
#
# The network (a private /24, nothing routed or NATed to the outside):
#   bridge hpbr0 on the host, address NET.1, host name `hphead` (slurmctld listens there)
#   node i (1..N): namespace hp-node<i>, interface `eth0` (a veth whose other end is on the
#                  bridge), address NET.(10+i), host name `node<i>`; `lo` up
# The names are added to /etc/hosts between marker lines (every namespace reads the same file)
# and removed by `down`. Each node also has its own UTS namespace, so that `hostname` there says
# node<i>, which resolves to the node's address, as on a real cluster (MPI groups ranks by host
# name); the file system and the processes stay shared.
#
# SLURM: SLURM_CONF=$HP_NETNS_DIR/slurm.conf (never /etc/slurm), controller port 6827 so that the
# one-node cluster of scripts/slurm_local_cluster.sh can run beside it; node i runs
# `slurmd -N node<i>` with its own spool, pid and log file (%n in slurm.conf). ssh: a key pair
# and host key made for this cluster; root logs in with the key only; ~/.ssh is not touched.
#
# Environment:
#   HP_NETNS_DIR    state, keys, configuration, logs and pid files (default /tmp/hp-netns)
#   HP_NETNS_NODES  number of nodes (default 2)
#   HP_NETNS_NET    first three octets of the private /24 (default 10.231.0)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# install, start_munge, common_conf, pid_alive, stop_pidfile
# shellcheck source=scripts/slurm_local_cluster.sh
source "$HERE/slurm_local_cluster.sh"

DIR=${HP_NETNS_DIR:-/tmp/hp-netns}
NODES=${HP_NETNS_NODES:-2}
NET=${HP_NETNS_NET:-10.231.0}
BRIDGE=hpbr0
CTLD_PORT=6827
STATE_DIR=$DIR                      # where start_munge leaves its "we started munged" marker
export SLURM_CONF=$DIR/slurm.conf
HOSTS_BEGIN="# hp-deepspeed netns_cluster begin"
HOSTS_END="# hp-deepspeed netns_cluster end"

log() { echo "[netns_cluster] $*" >&2; }

node_ids() { seq 1 "$NODES"; }
ns_of() { echo "hp-node$1"; }
addr_of() { echo "$NET.$((10 + $1))"; }
UTS_DIR=/run/hp-netns-uts
uts_of() { echo "$UTS_DIR/node$1"; }
# nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mount slurmd needs.
in_node() { local i=$1; shift; nsenter --net="/run/netns/$(ns_of "$i")" --uts="$(uts_of "$i")" "$@"; }

# A persistent UTS namespace per node (a bind mount of it), its host name node<i>.
uts_up() {
  local i file
  mkdir -p "$UTS_DIR"
  for i in $(node_ids); do
    file=$(uts_of "$i")
    mountpoint -q "$file" 2>/dev/null && continue
    touch "$file"
    unshare --uts="$file" hostname "node$i"
  done
}

uts_down() {
  local i file
  for i in $(node_ids); do
    file=$(uts_of "$i")
    mountpoint -q "$file" 2>/dev/null && umount "$file"
    rm -f "$file"
  done
}

network_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr show dev "$BRIDGE" | grep -F " $NET.1/24" >/dev/null || ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local i ns
  for i in $(node_ids); do
    ns=$(ns_of "$i")
    ip netns list | grep -w "$ns" >/dev/null || ip netns add "$ns"
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
      ip link del "hpv$i" 2>/dev/null || true
      ip link add "hpv$i" type veth peer name "hpp$i"
      ip link set "hpp$i" netns "$ns"
      ip -n "$ns" link set "hpp$i" name eth0
    fi
    ip link set "hpv$i" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" addr show dev eth0 | grep -F " $(addr_of "$i")/24" >/dev/null ||
      ip -n "$ns" addr add "$(addr_of "$i")/24" dev eth0
  done
}

# /etc/hosts is rewritten in place (same inode): in containers it is often a bind mount.
hosts_without_ours() { sed "/^$HOSTS_BEGIN\$/,/^$HOSTS_END\$/d" /etc/hosts; }

hosts_up() {
  local rest i
  rest=$(hosts_without_ours)
  {
    echo "$rest"
    echo "$HOSTS_BEGIN"
    echo "$NET.1 hphead"
    for i in $(node_ids); do echo "$(addr_of "$i") node$i"; done
    echo "$HOSTS_END"
  } > /etc/hosts
}

hosts_down() {
  grep -qxF "$HOSTS_BEGIN" /etc/hosts || return 0
  local rest
  rest=$(hosts_without_ours)
  echo "$rest" > /etc/hosts
}

ssh_files() {
  mkdir -p "$DIR/ssh" /run/sshd
  [ -f "$DIR/ssh/hostkey" ] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh/hostkey"
  [ -f "$DIR/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh/id_ed25519"
  cp "$DIR/ssh/id_ed25519.pub" "$DIR/ssh/authorized_keys"
  cat > "$DIR/ssh/sshd_config" <<EOF
Port 22
HostKey $DIR/ssh/hostkey
AuthorizedKeysFile $DIR/ssh/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
EOF
  cat > "$DIR/ssh/config" <<EOF
Host hphead node*
  IdentityFile $DIR/ssh/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  BatchMode yes
  LogLevel ERROR
EOF
  cat > "$DIR/env.sh" <<EOF
# Written by scripts/netns_cluster.sh: source it to use the netns cluster from a shell.
export SLURM_CONF=$SLURM_CONF
export PDSH_SSH_ARGS_APPEND="-F $DIR/ssh/config"
export OMPI_MCA_plm_rsh_args="-F $DIR/ssh/config"   # Open MPI 4
export PRTE_MCA_plm_ssh_args="-F $DIR/ssh/config"   # Open MPI 5 (PRRTE)
EOF
}

write_conf() {
  local i cpus
  cpus=$(nproc --all)  # not plain nproc: it follows OMP_NUM_THREADS, which the tests set to 1
  mkdir -p "$DIR"/{ctld,spool,log}
  {
    cat <<EOF
# written by hp-deepspeed scripts/netns_cluster.sh
ClusterName=hpnetns
SlurmctldHost=$(hostname -s)($NET.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=6818
EOF
    common_conf
    for i in $(node_ids); do
      echo "NodeName=node$i NodeAddr=$(addr_of "$i") CPUs=$cpus State=UNKNOWN"
    done
    echo "PartitionName=nodes Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$SLURM_CONF.tmp"
  mv "$SLURM_CONF.tmp" "$SLURM_CONF"
}

idle_nodes() { sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true; }

daemons_up() {
  pid_alive "$DIR/slurmctld.pid" || daemon slurmctld -i
  local i
  for i in $(node_ids); do
    mkdir -p "$DIR/spool/node$i"
    pid_alive "$DIR/slurmd-node$i.pid" || daemon in_node "$i" slurmd -N "node$i"
    pid_alive "$DIR/sshd-node$i.pid" ||
      daemon in_node "$i" "$(command -v sshd || echo /usr/sbin/sshd)" -f "$DIR/ssh/sshd_config" \
        -o "PidFile=$DIR/sshd-node$i.pid" -E "$DIR/log/sshd-node$i.log"
  done
}

wait_idle() {
  local n
  for n in $(seq 1 90); do
    [ "$(idle_nodes)" -eq "$NODES" ] && return 0
    # A node left DOWN by an earlier run returns by itself (ReturnToService=2); do not wait.
    [ "$n" -eq 5 ] && scontrol update NodeName="node[1-$NODES]" State=RESUME 2>/dev/null || true
    sleep 1
  done
  log "not every node became idle in 90s; logs in $DIR/log"
  sinfo -N -l >&2 || true
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

ssh_ok() {
  local i
  for i in $(node_ids); do
    ssh -F "$DIR/ssh/config" -o ConnectTimeout=10 "node$i" true || return 1
  done
}

up() {
  install sshd:openssh-server pdsh:pdsh ip:iproute2
  mkdir -p "$DIR"
  network_up
  uts_up
  hosts_up
  ssh_files
  [ -f "$SLURM_CONF" ] && pid_alive "$DIR/slurmctld.pid" || write_conf
  start_munge
  daemons_up
  wait_idle
  local n
  for n in $(seq 1 30); do ssh_ok && break; sleep 1; done
  ssh_ok || { log "sshd of a node does not accept the key; see $DIR/log/sshd-*.log"; exit 1; }
  sinfo
}

down() {
  local i ns
  for i in $(node_ids); do
    stop_pidfile "$DIR/sshd-node$i.pid"
    stop_pidfile "$DIR/slurmd-node$i.pid"
  done
  stop_pidfile "$DIR/slurmctld.pid"
  for i in $(node_ids); do
    ns=$(ns_of "$i")
    ip netns list | grep -w "$ns" >/dev/null || continue
    # Whatever a job left running in the node (a rank, a launcher) goes with it.
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns"
  done
  for i in $(node_ids); do ip link del "hpv$i" 2>/dev/null || true; done
  uts_down
  ip link del "$BRIDGE" 2>/dev/null || true
  hosts_down
  if [ -f "$DIR/munged.ours" ] && ! pid_alive "${HP_SLURM_DIR:-/tmp/hp-slurm}/slurmctld.pid"; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$DIR/munged.ours"
  fi
  log "down"
}

status() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || { log "no bridge $BRIDGE"; return 1; }
  pid_alive "$DIR/slurmctld.pid" || { log "slurmctld not running"; return 1; }
  local i
  for i in $(node_ids); do
    ip netns list | grep -w "$(ns_of "$i")" >/dev/null || { log "no namespace $(ns_of "$i")"; return 1; }
    mountpoint -q "$(uts_of "$i")" || { log "no UTS namespace $(uts_of "$i")"; return 1; }
    pid_alive "$DIR/slurmd-node$i.pid" || { log "slurmd of node$i not running"; return 1; }
    pid_alive "$DIR/sshd-node$i.pid" || { log "sshd of node$i not running"; return 1; }
  done
  sinfo && [ "$(idle_nodes)" -eq "$NODES" ]
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
