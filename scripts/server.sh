#!/usr/bin/env bash
# Start or stop a local Prefect or MLflow server, by PID, with its state in one folder.
#
#   scripts/server.sh prefect start [DIR] [PORT]   # prints PREFECT_API_URL=http://127.0.0.1:PORT/api
#   scripts/server.sh mlflow  start [DIR] [PORT]   # prints MLFLOW_TRACKING_URI=http://127.0.0.1:PORT
#   scripts/server.sh prefect|mlflow stop [DIR]
#
# DIR (default $LMFORGE_HOME/servers/KIND, LMFORGE_HOME defaulting to ./lmforge-home) holds the
# SQLite database, server.pid, server.log, server.url (the URL printed, without its variable
# name: how `python -m flows.lifecycle` finds the Prefect server), and MLflow's artifacts/.
# PORT: 4200 (Prefect), 5000 (MLflow). The server runs in a session of its own (setsid), so stop
# signals its whole process group (uvicorn/gunicorn workers included) — the group this script
# started, never a process found by name. start waits (at most LMFORGE_SERVER_TIMEOUT s, default
# 120) for the health endpoint to answer; start and stop are idempotent. Prefect runs with
# analytics off; MLflow with one worker and no job consumers (~500 MB and ~5 s to start, instead
# of ~2.5 GB and ~17 s).
set -euo pipefail

kind=${1:?usage: server.sh prefect|mlflow start|stop [DIR] [PORT]}
action=${2:?usage: server.sh prefect|mlflow start|stop [DIR] [PORT]}
home=${LMFORGE_HOME:-$PWD/lmforge-home}
dir=$(mkdir -p "${3:-$home/servers/$kind}" && cd "${3:-$home/servers/$kind}" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
exe=$(command -v "$repo/.venv/bin/$kind" || command -v "$kind" || true)  # the project's, else PATH's
pidfile=$dir/server.pid
urlfile=$dir/server.url
timeout_s=${LMFORGE_SERVER_TIMEOUT:-120}

case $kind in
    prefect) port=${4:-4200}; health=http://127.0.0.1:$port/api/health
             url="PREFECT_API_URL=http://127.0.0.1:$port/api" ;;
    mlflow)  port=${4:-5000}; health=http://127.0.0.1:$port/health
             url="MLFLOW_TRACKING_URI=http://127.0.0.1:$port" ;;
    *) echo "server.sh: unknown server $kind (prefect or mlflow)" >&2; exit 2 ;;
esac
[[ -n $exe ]] || { echo "server.sh: no $kind command (install the project: make test)" >&2; exit 2; }

say() { printf '[%s server] %s\n' "$kind" "$*" >&2; }

# alive = exists and is not a zombie (where PID 1 does not reap, a dead leader lingers as one)
alive() {
    local state
    [[ -r /proc/$1/stat ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [[ $state != Z && $state != X ]]
}

group_alive() {  # any process left in the group
    local pid
    for pid in $(pgrep -g "$1" 2>/dev/null || true); do alive "$pid" && return 0; done
    return 1
}

recorded() { [[ -s $pidfile ]] && cat "$pidfile"; }

stop() {
    local pid
    pid=$(recorded) || { say "not running (no $pidfile)"; return 0; }
    if group_alive "$pid"; then
        say "stopping process group $pid"
        kill -INT -- "-$pid" 2>/dev/null || true
        for _ in $(seq 1 200); do group_alive "$pid" || break; sleep 0.1; done
        if group_alive "$pid"; then
            say "still running after 20 s: SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile" "$urlfile"
}

start() {
    local pid
    if pid=$(recorded) && alive "$pid" && curl -fsS -o /dev/null "$health" 2>/dev/null; then
        say "already running (pid $pid)"
        echo "$url"
        return 0
    fi
    rm -f "$pidfile" "$urlfile"
    case $kind in
        prefect)
            PREFECT_HOME=$dir PREFECT_SERVER_ANALYTICS_ENABLED=false \
            PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$dir/prefect.db" \
                setsid "$exe" server start --host 127.0.0.1 --port "$port" \
                >"$dir/server.log" 2>&1 </dev/null &
            ;;
        mlflow)
            mkdir -p "$dir/artifacts"
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
                setsid "$exe" server --backend-store-uri "sqlite:///$dir/mlflow.db" \
                --default-artifact-root "$dir/artifacts" --host 127.0.0.1 --port "$port" \
                --workers 1 >"$dir/server.log" 2>&1 </dev/null &
            ;;
    esac
    pid=$!
    echo "$pid" >"$pidfile"
    for _ in $(seq 1 $((timeout_s * 2))); do
        if curl -fsS -o /dev/null "$health" 2>/dev/null; then
            say "up (pid $pid, $dir)"
            echo "${url#*=}" >"$urlfile"
            echo "$url"
            return 0
        fi
        alive "$pid" || break
        sleep 0.5
    done
    say "did not answer $health within ${timeout_s}s; the end of $dir/server.log:"
    tail -n 30 "$dir/server.log" >&2 || true
    stop
    return 1
}

case $action in
    start) start ;;
    stop) stop ;;
    *) echo "server.sh: unknown action $action (start or stop)" >&2; exit 2 ;;
esac
