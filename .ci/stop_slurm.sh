#!/usr/bin/env bash
# Stop the Slurm started by ci/start_slurm.sh for STATE_DIR (argument, else $FCMAE_SLURM_DIR, else
# /tmp/fcmae-slurm): cancel its jobs, kill slurmd and slurmctld, remove the folder. Idempotent.
# munged is left running unless FCMAE_SLURM_STOP_MUNGE=1 (it is shared by anything using munge).
set -uo pipefail
DIR=${1:-${FCMAE_SLURM_DIR:-/tmp/fcmae-slurm}}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
log() { echo "stop_slurm: $*" >&2; }

if [ -f "$DIR/slurm.conf" ] && command -v scancel >/dev/null; then
    export SLURM_CONF=$DIR/slurm.conf
    if [ -n "$(timeout 5 squeue -h 2>/dev/null)" ]; then
        # cancel the jobs and give them KillWait (+ a little) to end, so no job process outlives the daemons
        timeout 5 scancel --user "$(id -un)" >/dev/null 2>&1 || true
        for _ in $(seq ${FCMAE_SLURM_STOP_WAIT:-40}); do
            [ -n "$(timeout 5 squeue -h 2>/dev/null)" ] || break
            sleep 1
        done
    fi
fi
for d in slurmd slurmctld; do
    pidfile=$DIR/$d.pid
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid=$(cat "$pidfile")
        $SUDO kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { log "$d ($pid) ignored SIGTERM, SIGKILL"; $SUDO kill -KILL "$pid" 2>/dev/null || true; }
        log "stopped $d ($pid)"
    fi
done
# slurmstepd processes of jobs still finishing (they outlive slurmd): ours have files open in $DIR/spool;
# kill them and what runs under them.
descendants() { for c in $(pgrep -P "$1" 2>/dev/null); do descendants "$c"; echo "$c"; done; }
for pid in $(pgrep -x slurmstepd 2>/dev/null); do
    if ls -l /proc/$pid/fd 2>/dev/null | grep -q -- "$DIR/"; then
        victims="$(descendants "$pid") $pid"
        log "killing leftover slurmstepd $pid and its processes"
        $SUDO kill -KILL $victims 2>/dev/null || true
    fi
done
if [ "${FCMAE_SLURM_STOP_MUNGE:-0}" = 1 ] && [ -f /run/munge/munged.pid ]; then
    $SUDO kill "$(cat /run/munge/munged.pid)" 2>/dev/null && log "stopped munged"
fi
case "$DIR" in
    /|"") ;;
    *) $SUDO rm -rf "$DIR" ;;
esac
exit 0
