#!/usr/bin/env bash
# Stop the lmforge test cluster started by start.sh: exactly the processes recorded in
# $RUN/pids, in reverse start order, by pid (never by name), each after checking that the pid
# still runs the recorded executable, waiting for each to exit. Idempotent.
# Jobs still in the queue are cancelled first (slurmd leaves running job steps behind otherwise).
set -euo pipefail

RUN=${LMFORGE_TESTCLUSTER_DIR:-/tmp/lmforge-testcluster}
PIDS=$RUN/pids
export SLURM_CONF=$RUN/etc/slurm.conf
WAIT=${LMFORGE_TESTCLUSTER_STOP_WAIT:-20}   # seconds per daemon before SIGKILL

say() { printf '[testcluster stop] %s\n' "$*" >&2; }

if [[ ! -s $PIDS ]]; then
    say "nothing recorded in $PIDS: not running"
    exit 0
fi

exe_of() { readlink "/proc/$1/exe" 2>/dev/null || true; }
# running = exists, is not a zombie (daemons whose parent exited may stay unreaped), same executable
running() {
    local pid=$1 exe=$2 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
    [[ $state != Z && $state != X ]] || return 1
    [[ $(exe_of "$pid") == "$exe" ]]
}

# cancel this cluster's jobs while slurmctld still runs, so that no job step outlives its slurmd
ctld=$(awk '$1 == "slurmctld" {print $2, $3}' "$PIDS")
if [[ -n $ctld ]] && running $ctld && [[ -f $SLURM_CONF ]]; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        say "cancelling jobs: $(echo $jobs)"
        timeout 10 scancel $jobs || true
        for _ in $(seq 1 $((WAIT * 2))); do
            [[ -z $(timeout 10 squeue -h -o %i 2>/dev/null || true) ]] && break
            sleep 0.5
        done
    fi
fi

# reverse order: slurmd n2, slurmd n1, slurmctld, slurmdbd, mariadbd, munged
tac "$PIDS" | while read -r name pid exe; do
    if ! running "$pid" "$exe"; then
        say "$name (pid $pid) is not running"
        continue
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((WAIT * 10))); do
        running "$pid" "$exe" || break
        sleep 0.1
    done
    if running "$pid" "$exe"; then
        say "$name (pid $pid) still running after ${WAIT}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
done
rm -f "$PIDS"
say "stopped (state, database and logs stay in $RUN)"
