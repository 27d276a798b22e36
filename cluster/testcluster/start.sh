#!/usr/bin/env bash
# Start the lmforge test cluster: a real Slurm (Debian's 22.05) with accounting on this host,
# two fake nodes n1 and n2, partition "debug". Everything lives under the run folder
# ${LMFORGE_TESTCLUSTER_DIR:-/tmp/lmforge-testcluster}; stop it with stop.sh.
#
# Idempotent: when the cluster is already up it prints the environment and exits 0 at once.
# Needs root (it installs packages, edits /etc/hosts and starts daemons as root).
#
# Exit status: 0 up; 2 not root; 3 packages missing and cannot be installed; 1 anything else.
# Clients need SLURM_CONF from "$RUN/env.sh" (printed at the end).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN=${LMFORGE_TESTCLUSTER_DIR:-/tmp/lmforge-testcluster}
CLUSTER=${LMFORGE_TESTCLUSTER_NAME:-lmforge}
CTLD_PORT=${LMFORGE_TESTCLUSTER_CTLD_PORT:-6817}
DBD_PORT=${LMFORGE_TESTCLUSTER_DBD_PORT:-6819}
DB_PORT=${LMFORGE_TESTCLUSTER_DB_PORT:-3306}
NODE_PORT1=${LMFORGE_TESTCLUSTER_NODE_PORT:-17001}
NODE_PORT2=$((NODE_PORT1 + 1))
TIMEOUT=${LMFORGE_TESTCLUSTER_TIMEOUT:-60}   # seconds to wait for each daemon / the nodes
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=lmforge-testcluster   # throw-away database reachable from 127.0.0.1 only
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

ETC=$RUN/etc
LOG=$RUN/log
PIDS=$RUN/pids          # "name pid exe" per line, in start order
export SLURM_CONF=$ETC/slurm.conf
T0=$SECONDS

say() { printf '[testcluster %3ds] %s\n' $((SECONDS - T0)) "$*" >&2; }

[[ $(id -u) -eq 0 ]] || { say "ERROR: must run as root (installs packages, starts daemons)"; exit 2; }

# ---------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || { say "ERROR: apt-get not found, cannot install ${missing[*]}"; exit 3; }
    say "installing ${missing[*]}"
    # apt-get update only when the package lists do not offer every package yet
    known=$(apt-cache policy "${missing[@]}" 2>/dev/null | grep -c 'Candidate: [^(]' || true)
    if ((known < ${#missing[@]})); then
        say "apt-get update"
        apt-get update -q >&2 || { say "ERROR: apt-get update failed"; exit 3; }
    fi
    # keep the packages' init scripts from starting system daemons (munge, mariadb, slurm*) on the
    # default ports: this script starts its own, on its own paths
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || rc=$?
    if [[ $(trap -p EXIT) ]]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    ((rc == 0)) || { say "ERROR: apt-get install ${missing[*]} failed (status $rc)"; exit 3; }
    say "installed"
fi

# ---------------------------------------------------------------- helpers
exe_of() { readlink "/proc/$1/exe" 2>/dev/null || true; }
# alive = exists, not a zombie (nobody may reap daemons whose parent exited), same executable
alive() {
    local pid=$1 exe=$2 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [[ $state != Z && $state != X ]] || return 1
    [[ $(exe_of "$pid") == "$exe" ]]
}
all_alive() {
    [[ -s $PIDS ]] || return 1
    local name pid exe
    while read -r name pid exe; do alive "$pid" "$exe" || return 1; done <"$PIDS"
    [[ $(wc -l <"$PIDS") -eq 6 ]]
}
print_env() {
    say "up; clients need:"
    echo "SLURM_CONF=$SLURM_CONF"
    echo "# or: source $RUN/env.sh"
}
tail_logs() {
    local f
    for f in "$@"; do
        [[ -f $f ]] || continue
        echo "----- last lines of $f" >&2
        tail -n 25 "$f" >&2
    done
}
# launch NAME EXE CMD...: start a daemon in the foreground in its own session (so a Ctrl-C or the
# end of the caller's process group does not reach it) and record "NAME PID EXE" at once.
# setsid execs (this script's children are not process-group leaders), and so does setpriv, so $!
# is the daemon's own pid; we check that it becomes EXE.
launch() {
    local name=$1 exe; shift
    exe=$(readlink -f "$1"); shift   # /usr/sbin/slurmd is an alternatives link to slurmd-wlm
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    LAUNCHED_PID=$!
    echo "$name $LAUNCHED_PID $exe" >>"$PIDS"
    local deadline=$((SECONDS + 5))
    until [[ $(exe_of "$LAUNCHED_PID") == "$exe" ]]; do
        if ! kill -0 "$LAUNCHED_PID" 2>/dev/null || ((SECONDS >= deadline)); then
            say "ERROR: $name (pid $LAUNCHED_PID) did not start"
            tail_logs "${WAIT_LOGS[@]}" "$LOG/$name.out"
            fail_cleanup
        fi
        sleep 0.05
    done
}
# wait_for NAME PID WHAT CHECK-CMD...: poll CHECK-CMD; on the daemon's death or after $TIMEOUT s,
# print the tails of the logs in WAIT_LOGS and stop everything
wait_for() {
    local name=$1 pid=$2 what=$3; shift 3
    local deadline=$((SECONDS + TIMEOUT)) exe
    exe=$(exe_of "$pid")
    until "$@" >/dev/null 2>&1; do
        if ! alive "$pid" "$exe"; then
            say "ERROR: $name (pid $pid) exited while waiting for $what"
            tail_logs "${WAIT_LOGS[@]}" "$LOG/$name.out"
            fail_cleanup
        fi
        if ((SECONDS >= deadline)); then
            say "ERROR: timed out after ${TIMEOUT}s waiting for $what"
            [[ -n ${WAIT_INFO:-} ]] && eval "$WAIT_INFO" >&2
            tail_logs "${WAIT_LOGS[@]}" "$LOG/$name.out"
            fail_cleanup
        fi
        sleep 0.3
    done
}
fail_cleanup() {
    say "stopping what was started (logs stay in $LOG)"
    bash "$HERE/stop.sh" >&2 || true
    exit 1
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- already up?
if all_alive && timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    print_env
    exit 0
fi
if [[ -s $PIDS ]]; then
    say "a partly running cluster was found in $RUN: stopping it first"
    bash "$HERE/stop.sh" >&2
fi

# ---------------------------------------------------------------- names must resolve
# slurmctld reaches node nX at address nX; submitit/torch use the first node name as MASTER_ADDR
for h in n1 n2 "$(hostname)"; do
    if ! getent hosts "$h" >/dev/null; then
        say "adding '127.0.0.1 $h' to /etc/hosts"
        echo "127.0.0.1 $h" >>/etc/hosts   # append: /etc/hosts is often a bind mount (no sed -i)
    fi
done

# ---------------------------------------------------------------- configs
mkdir -p "$ETC" "$LOG" "$RUN/state" "$RUN/munge" "$RUN/mariadb/data" "$RUN/mariadb/run"
rm -f "$PIDS"
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_TOTAL_MB=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
# both nodes share this host's memory: each gets 3/8 of it (3/4 in all, 1/4 headroom)
MEM_MB=$((MEM_TOTAL_MB * 3 / 8))
((MEM_MB >= 256)) || MEM_MB=256
fill() {
    sed -e "s|@RUN@|$RUN|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@NODE_PORT1@|$NODE_PORT1|g" -e "s|@NODE_PORT2@|$NODE_PORT2|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
        -e "s|@DB_USER@|$DB_USER|g" -e "s|@DB_PASS@|$DB_PASS|g" -e "s|@DB_NAME@|$DB_NAME|g" "$1"
}
fill "$HERE/slurm.conf.in" >"$ETC/slurm.conf"
(umask 077 && fill "$HERE/slurmdbd.conf.in" >"$ETC/slurmdbd.conf")
chmod 600 "$ETC/slurmdbd.conf"
chmod 644 "$ETC/slurm.conf"
printf 'export SLURM_CONF=%q\nexport LMFORGE_TESTCLUSTER_DIR=%q\n' "$SLURM_CONF" "$RUN" >"$RUN/env.sh"
say "configs in $ETC (CPUs=$CPUS RealMemory=${MEM_MB}MB per node)"

# ---------------------------------------------------------------- munged
chown munge:munge "$RUN/munge" && chmod 755 "$RUN/munge"
if [[ ! -s $RUN/munge/munge.key ]]; then
    mungekey --create --keyfile="$RUN/munge/munge.key" >&2
fi
chown munge:munge "$RUN/munge/munge.key" && chmod 400 "$RUN/munge/munge.key"
WAIT_LOGS=()   # munged logs to its stderr (log/munged.out) in the foreground
launch munged /usr/sbin/munged \
    setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
    --key-file="$RUN/munge/munge.key" --socket="$RUN/munge/munge.socket" \
    --pid-file="$RUN/munge/munged.pid" --log-file="$RUN/munge/munged.log" \
    --seed-file="$RUN/munge/munged.seed"
wait_for munged "$LAUNCHED_PID" "munged to answer" \
    bash -c "munge -n --socket='$RUN/munge/munge.socket' | unmunge --socket='$RUN/munge/munge.socket'"
say "munged up"

# ---------------------------------------------------------------- MariaDB
DATA=$RUN/mariadb/data
SOCK=$RUN/mariadb/run/mysqld.sock
chown -R mysql:mysql "$RUN/mariadb"
if [[ ! -d $DATA/mysql ]]; then
    say "initialising MariaDB datadir $DATA"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DATA" --basedir=/usr \
        --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.out" 2>&1 ||
        { tail_logs "$LOG/mariadb-install.out"; say "ERROR: mariadb-install-db failed"; fail_cleanup; }
fi
WAIT_LOGS=("$RUN/mariadb/run/mariadb.err")
launch mariadbd /usr/sbin/mariadbd \
    /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DATA" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$SOCK" \
    --pid-file="$RUN/mariadb/run/mariadbd.pid" --log-error="$RUN/mariadb/run/mariadb.err" \
    --skip-log-bin --performance-schema=OFF \
    --innodb-lock-wait-timeout=900
wait_for mariadbd "$LAUNCHED_PID" "MariaDB on $SOCK" mariadb-admin --no-defaults --socket="$SOCK" -u root ping
mariadb --no-defaults --socket="$SOCK" -u root <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
SQL
say "MariaDB up (127.0.0.1:$DB_PORT, database $DB_NAME)"

# ---------------------------------------------------------------- slurmdbd
# slurmdbd has no -f: it reads slurmdbd.conf from the folder of $SLURM_CONF (exported above)
WAIT_LOGS=("$LOG/slurmdbd.log")
launch slurmdbd /usr/sbin/slurmdbd /usr/sbin/slurmdbd -D
wait_for slurmdbd "$LAUNCHED_PID" "slurmdbd on port $DBD_PORT" port_open "$DBD_PORT"
add_cluster() {
    local out
    out=$(sacctmgr -i add cluster "$CLUSTER" 2>&1) && return 0
    grep -qi 'already exists' <<<"$out"
}
wait_for slurmdbd "$LAUNCHED_PID" "sacctmgr add cluster $CLUSTER" add_cluster
say "slurmdbd up (port $DBD_PORT), cluster '$CLUSTER' registered"

# ---------------------------------------------------------------- slurmctld
WAIT_LOGS=("$LOG/slurmctld.log")
launch slurmctld /usr/sbin/slurmctld /usr/sbin/slurmctld -D -f "$SLURM_CONF"
ctld_up() { scontrol ping | grep -q 'is UP'; }
wait_for slurmctld "$LAUNCHED_PID" "slurmctld (scontrol ping)" ctld_up
say "slurmctld up (port $CTLD_PORT)"
# jobs recovered from the state of a previous run of this cluster lost their processes with it;
# left alone they hold their nodes allocated and the nodes never turn idle
stale=$(squeue -h -o %i | tr '\n' ' ')
if [[ -n ${stale// } ]]; then
    say "cancelling jobs left from the cluster's previous run: $stale"
    scancel $stale
fi

# ---------------------------------------------------------------- slurmd n1, n2
for n in n1 n2; do
    rm -rf "$RUN/slurmd.$n" && mkdir -p "$RUN/slurmd.$n"   # no job scripts of a previous run
    WAIT_LOGS=("$LOG/slurmd.$n.log")
    launch "slurmd-$n" /usr/sbin/slurmd /usr/sbin/slurmd -D -N "$n" -f "$SLURM_CONF"
done
nodes_idle() {
    local out
    out=$(sinfo -h -N -p debug -o '%N %t' | sort -u)
    [[ $out == $'n1 idle\nn2 idle' ]]
}
WAIT_LOGS=("$LOG/slurmctld.log" "$LOG/slurmd.n1.log" "$LOG/slurmd.n2.log" "$LOG/slurmd-n1.out" "$LOG/slurmd-n2.out")
WAIT_INFO="echo 'sinfo now:'; sinfo -N -l"
wait_for slurmd-n2 "$LAUNCHED_PID" "nodes n1 and n2 to be idle in partition debug" nodes_idle
say "nodes n1, n2 idle in partition debug (started in $((SECONDS - T0))s)"
print_env
