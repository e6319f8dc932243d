#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/test_slurm.py (which submits a tiny sweep to it).
#
# Installs Debian's slurmctld, slurmd and munge, writes /etc/slurm/slurm.conf for this host (no cgroups, no
# accounting: it runs in containers), starts munged, slurmctld and slurmd as root and waits until the node
# is idle. Safe to run again: an answering cluster is left as it is, running daemons are not restarted.
# It never fails CI: when something does not work it prints one line, "slurm_up: no cluster (...)", and
# exits 0, and the test then skips with its own reason.
set -uo pipefail

WAIT_S=${SLURM_UP_WAIT_S:-60}  # for the node to register after the daemons started
LOG_DIR=/var/log/slurm
NODE=$(hostname -s)

give_up() {
  echo "slurm_up: no cluster ($*); tests/test_slurm.py will skip"
  exit 0
}

node_up() {  # the controller answers and the node takes jobs
  local state
  state=$(timeout 5 sinfo -h -N -n "$NODE" -o %t 2>/dev/null) || return 1
  [[ $state =~ ^(idle|mix|alloc)$ ]]
}

# The daemon named runs, by its pid file (the controller lists a node as idle for minutes after its slurmd died).
running() { pgrep -F "/run/$1.pid" -x "$1" >/dev/null 2>&1; }

[[ $(id -u) == 0 ]] || give_up "run as root to install and start the daemons"
if command -v sinfo >/dev/null && running slurmctld && running slurmd && node_up; then
  echo "slurm_up: node $NODE already up"
  exit 0
fi
started=$SECONDS

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd munge slurm-client; } \
    >/tmp/slurm_up-apt.log 2>&1 || give_up "apt-get install failed: $(tail -n 1 /tmp/slurm_up-apt.log)"
fi

# munge: a key (Debian's postinst normally made one), its socket folder, the daemon as its own user
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --keyfile=/etc/munge/munge.key || give_up "cannot create /etc/munge/munge.key"
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged 2>/tmp/slurm_up-munged.log \
    || give_up "munged did not start: $(tail -n 1 /tmp/slurm_up-munged.log)"
fi
munge -n | unmunge >/dev/null 2>&1 || give_up "munge credentials do not round-trip (munge -n | unmunge)"

# slurm.conf for this host. The daemons run as root, so Debian's spool folders need no ownership changes.
# Memory is not a consumable resource (CR_Core), so tasks share it; RealMemory stays under the machine's so
# that slurmd does not drain the node for having less than configured.
cpus=$(nproc)
memory_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOG_DIR"
cat >/etc/slurm/slurm.conf <<EOF
# Written by .ci/slurm_up.sh: one node, $NODE, for the tests.
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

running slurmctld || slurmctld \
  || give_up "slurmctld did not start: $(tail -n 1 $LOG_DIR/slurmctld.log 2>/dev/null)"
running slurmd || slurmd \
  || give_up "slurmd did not start: $(tail -n 1 $LOG_DIR/slurmd.log 2>/dev/null)"

deadline=$(( SECONDS + WAIT_S ))
until node_up; do
  if (( SECONDS >= deadline )); then
    state=$(timeout 5 sinfo -h -N -o '%t %E' 2>&1 | head -n 1)
    give_up "node $NODE not idle after ${WAIT_S} s: sinfo says '$state'; logs in $LOG_DIR"
  fi
  sleep 1
done
echo "slurm_up: node $NODE idle ($cpus CPUs, Slurm $(sinfo --version | cut -d' ' -f2)) after $(( SECONDS - started )) s"
