#!/usr/bin/env bash
# A one-machine SLURM cluster for tests: munged + slurmctld + slurmd, every file under one folder,
# loopback addresses only, no systemd. Needs root (slurmd starts jobs as the submitting user) and
# Debian's packages:  apt-get install -y --no-install-recommends slurm-wlm munge
#
#   SLURM_FIXTURE_DIR=/tmp/x tests/slurm_fixture.sh start    # prints: export SLURM_CONF=...
#   SLURM_FIXTURE_DIR=/tmp/x tests/slurm_fixture.sh stop     # stops the daemons (safe to repeat)
#   SLURM_FIXTURE_DIR=/tmp/x tests/slurm_fixture.sh status
#
# Ports: SLURM_FIXTURE_CTLD_PORT / SLURM_FIXTURE_SLURMD_PORT (defaults 16817 / 16818); pick free ones to
# run several fixtures side by side. The partition is called "debug". A start that fails stops what it
# started and prints the daemon logs. munged refuses a socket below a folder that others cannot traverse:
# SLURM_FIXTURE_DIR's parents must be world-executable (so not pytest's private temp folders).
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin

ROOT=${SLURM_FIXTURE_DIR:-${TMPDIR:-/tmp}/histoseg-slurm}
CTLD_PORT=${SLURM_FIXTURE_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_FIXTURE_SLURMD_PORT:-16818}
NODE=$(hostname -s)
SOCKET=$ROOT/run/munge.socket
export SLURM_CONF=$ROOT/etc/slurm.conf

# poll a command until it succeeds (10 s at most)
until_ok() {
  local i
  for i in $(seq 1 100); do
    if bash -c "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "slurm_fixture: gave up waiting for: $1" >&2
  return 1
}

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.7)}' /proc/meminfo)
  cat >"$SLURM_CONF" <<EOF
ClusterName=histoseg-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  mkdir -p "$ROOT"/{etc,run,state,spool,log,munge}
  chmod 700 "$ROOT/munge"
  chmod 755 "$ROOT" "$ROOT/run"
  if [ ! -s "$ROOT/munge/munge.key" ]; then
    head -c 1024 /dev/urandom >"$ROOT/munge/munge.key"
    chmod 400 "$ROOT/munge/munge.key"
  fi
  trap 'echo "slurm_fixture: start failed; logs:" >&2; tail -n 20 "$ROOT"/log/*.log >&2 || true; stop' ERR
  munged --key-file="$ROOT/munge/munge.key" --socket="$SOCKET" --pid-file="$ROOT/run/munged.pid" \
    --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/munged.seed"
  until_ok "munge -S '$SOCKET' -n | unmunge -S '$SOCKET'"
  write_conf
  slurmctld -f "$SLURM_CONF"
  until_ok "scontrol ping | grep -q UP"
  slurmd -f "$SLURM_CONF"
  until_ok "sinfo --noheader --format=%T | grep -q '^idle'"
  trap - ERR
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local name pid i
  local -A pids=()
  for name in slurmd slurmctld munged; do
    [ -f "$ROOT/run/$name.pid" ] && pids[$name]=$(cat "$ROOT/run/$name.pid")
  done
  # the controller stops itself and slurmd in ~1.5 s; plain SIGTERM makes slurmctld linger ~5 s
  if [ -n "${pids[slurmctld]:-}" ] && kill -0 "${pids[slurmctld]}" 2>/dev/null; then
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true
  fi
  for name in slurmd slurmctld munged; do
    pid=${pids[$name]:-}
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" || true; fi
    rm -f "$ROOT/run/$name.pid"
  done
}

status() {
  sinfo
  squeue
}

command=${1:-start}
case "$command" in
  start | stop | status) "$command" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
