#!/usr/bin/env bash
# Start a real one-node Slurm (slurmctld + slurmd + munged) on this machine, for tests and CI.
#
#   eval "$(ci/start_slurm.sh [STATE_DIR])"     # prints: export SLURM_CONF=STATE_DIR/slurm.conf
#
# STATE_DIR: the argument, else $FCMAE_SLURM_DIR, else /tmp/fcmae-slurm. Everything Slurm writes
# (conf, pid files, spool, state, daemon logs) lives there; ci/stop_slurm.sh STATE_DIR removes it.
# Idempotent: when the daemons of this STATE_DIR already run and the node answers, it only prints the
# export line. Installs the Debian packages when slurmctld is missing (root, or sudo without a password).
# Progress goes to stderr; stdout carries only the export line, so `eval "$(...)"` works.
#
# Environment:
#   FCMAE_SLURM_DIR           state folder (when no argument)
#   FCMAE_SLURM_PACKAGES      packages to install (default: slurmctld slurmd slurm-client munge,
#                             i.e. slurm-wlm without its 30-odd optional plugin packages)
#   FCMAE_SLURM_TIMEOUT       seconds to wait for the node to become idle (default 60)
#   FCMAE_SLURM_CRED_EXPIRE   AuthInfo cred_expire (s). Slurm holds a requeued job for cred_expire+1
#                             seconds before it may start again: 120 by default (the Slurm default),
#                             a test may lower it (Slurm accepts >= 5) to make requeue tests quicker.
#   FCMAE_SLURM_SCHED_PARAMS  SchedulerParameters (default sched_interval=2,bf_interval=2)
#   FCMAE_SLURM_KILLWAIT      KillWait (s), default 30 (Slurm's default)
#   FCMAE_SLURM_CTLD_PORT / FCMAE_SLURM_SLURMD_PORT   default 6817 / 6818
set -euo pipefail

DIR=${1:-${FCMAE_SLURM_DIR:-/tmp/fcmae-slurm}}
TIMEOUT=${FCMAE_SLURM_TIMEOUT:-60}
PACKAGES=${FCMAE_SLURM_PACKAGES:-slurmctld slurmd slurm-client munge}
log() { echo "start_slurm: $*" >&2; }
die() { echo "start_slurm: ERROR: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null || die "needs root (or passwordless sudo) to install and run the Slurm daemons"
    SUDO="sudo -n"
fi

# --- packages --------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
        || ! command -v munged >/dev/null; then
    log "installing $PACKAGES (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' maintainer scripts would try to start the services; on a machine without
    # systemd that fails harmlessly, but keep them from starting anything with policy-rc.d.
    policy=/usr/sbin/policy-rc.d; made_policy=0
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' | $SUDO tee $policy >/dev/null; $SUDO chmod +x $policy; made_policy=1; fi
    aptlog=${TMPDIR:-/tmp}/fcmae-slurm-apt.log
    # Try with the package lists there are; on failure (none, or stale) update them and retry.
    if ! $SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >"$aptlog" 2>&1; then
        log "apt-get update"
        $SUDO apt-get update -qq >>"$aptlog" 2>&1 || true
        if ! $SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >>"$aptlog" 2>&1; then
            [ $made_policy = 1 ] && $SUDO rm -f $policy
            die "apt-get install $PACKAGES failed; see $aptlog"
        fi
    fi
    [ $made_policy = 1 ] && $SUDO rm -f $policy
fi

HOST=$(hostname -s)
CPUS=$(nproc --all)  # not nproc: it honours OMP_NUM_THREADS
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
CONF=$DIR/slurm.conf
# a cluster name of this folder: the wait below checks that the controller answering is this one
# (not another test Slurm on the same ports)
CLUSTER=fcmae$(printf %s "$DIR" | md5sum | cut -c1-8)
export SLURM_CONF=$CONF

# Each probe's output is read whole before it is matched: with pipefail, `scontrol ... | grep -q`
# fails whenever grep exits on its match before scontrol has written the rest of its ~7 kB
# (SIGPIPE, status 141), which is most of the time.
node_idle() {
    local config state
    config=$(timeout 20 scontrol show config 2>/dev/null) || return 1
    state=$(timeout 20 sinfo -h -n "$HOST" -o '%t' 2>/dev/null) || return 1
    grep -qE "^ClusterName += $CLUSTER\$" <<<"$config" && grep -qE '^(idle|mix|alloc)' <<<"$state"
}
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- already running? ------------------------------------------------------------------------------
if [ -f "$CONF" ] && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_idle; then
    log "already running ($DIR)"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# --- munge -----------------------------------------------------------------------------------------
if ! (munge -n 2>/dev/null | unmunge >/dev/null 2>&1); then
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        $SUDO mungekey -c -f >/dev/null 2>&1 || $SUDO /usr/sbin/mungekey -c -f
        $SUDO chown munge:munge /etc/munge/munge.key; $SUDO chmod 400 /etc/munge/munge.key
    fi
    $SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
    $SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
    log "starting munged"
    $SUDO su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do (munge -n 2>/dev/null | unmunge >/dev/null 2>&1) && break; sleep 0.1; done
    (munge -n | unmunge >/dev/null) || die "munge does not answer after starting munged"
fi

# --- stale daemons of this folder --------------------------------------------------------------------
for d in slurmd slurmctld; do
    if alive "$DIR/$d.pid"; then $SUDO kill "$(cat "$DIR/$d.pid")" || true; fi
done
sleep 0.5

# --- conf ------------------------------------------------------------------------------------------
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
cat > "$CONF" <<CONF
# Written by ci/start_slurm.sh: a one-node Slurm for tests.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=${FCMAE_SLURM_CTLD_PORT:-6817}
SlurmdPort=${FCMAE_SLURM_SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${FCMAE_SLURM_CRED_EXPIRE:-120}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=${FCMAE_SLURM_KILLWAIT:-30}
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (defaults: 60 s main loop, 30 s backfill), so a test's
# requeued job starts soon after it becomes eligible.
SchedulerParameters=${FCMAE_SLURM_SCHED_PARAMS:-sched_interval=2,bf_interval=2}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# Preemption, to test it: a job in 'urgent' (higher PriorityTier) that needs the CPUs of a running
# 'debug' job makes Slurm requeue that job (PreemptMode=REQUEUE: SIGCONT+SIGTERM, SIGKILL after
# GraceTime/KillWait, then requeued like scontrol requeue).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES PriorityTier=1
PartitionName=urgent Nodes=$HOST Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10
CONF

# --- daemons ---------------------------------------------------------------------------------------
log "starting slurmctld and slurmd ($DIR)"
$SUDO env SLURM_CONF="$CONF" slurmctld -f "$CONF" -i || die "slurmctld did not start; see $DIR/log/slurmctld.log"
$SUDO env SLURM_CONF="$CONF" slurmd -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"

deadline=$((SECONDS + TIMEOUT))
until node_idle; do
    for d in slurmctld slurmd; do
        if [ -f "$DIR/$d.pid" ] && ! alive "$DIR/$d.pid"; then
            tail -n 20 "$DIR/log/$d.log" >&2 2>/dev/null || true
            die "$d exited (port in use by another Slurm? see $DIR/log/$d.log)"
        fi
    done
    if [ $SECONDS -ge $deadline ]; then
        sinfo -N 2>&1 | sed 's/^/  sinfo: /' >&2 || true
        tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
        die "node $HOST not idle after ${TIMEOUT}s (logs in $DIR/log)"
    fi
    sleep 0.5
done
log "node $HOST idle after $((SECONDS))s"
echo "export SLURM_CONF=$CONF"
