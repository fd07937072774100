#!/usr/bin/env bash
# A local Milvus standalone server for the Milvus store backend's tests and benchmark
# (docs/architecture.md §8, docs/scale-out.md).
#
#   scripts/milvus.sh start   install milvus==2.3.5 into .venv-milvus (once), start
#                             `milvus-server` in its own process group on 127.0.0.1:19530,
#                             wait until it serves (its own /healthz check), print the address
#   scripts/milvus.sh stop    check-loopback first (when it runs), then stop that process
#                             group and wait until it is gone; exits 1 if the check failed
#                             (the server is stopped all the same)
#   scripts/milvus.sh kill    SIGKILL that process group at once (the restart tests: a crash)
#   scripts/milvus.sh status  say whether it runs (exit 0) or not (exit 1)
#   scripts/milvus.sh check-loopback
#                             list the TCP connections the process group owns (from /proc;
#                             scripts/milvus_loopback.py) and exit 1, printing them, if one has
#                             an address off loopback; prints its listening sockets too
#
# Every component is told to register 127.0.0.1 (--extra-config NAME.ip=127.0.0.1), so all
# traffic between them stays on loopback; check-loopback shows it, and every `stop` runs it
# first, so CI's `scripts/milvus.sh stop` after the tests fails when traffic left loopback.
# Environment: MILVUS_DATA (default .milvus-data/ in the repository, wiped by `start` unless
# MILVUS_KEEP_DATA=1), MILVUS_START_TIMEOUT seconds (default 180).
#
# Restarting on kept data after a crash (`kill`, then `start` with MILVUS_KEEP_DATA=1): the
# dead instance's sessions stay in the embedded etcd until their lease expires, and until
# then the new coordinators cannot register ("CompareAndSwap error for compare is false for
# key: rootcoord") and the others find "no available rootcoord". With the server's default
# lease of 30 s that was 56-61 s from start to serving; SESSION_TTL below shortens it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv-milvus"
DATA="${MILVUS_DATA:-$ROOT/.milvus-data}"
PIDFILE="$DATA.pgid"
LOG="$DATA.log"
PORT=19530
COMPONENTS=(rootCoord proxy queryCoord queryNode indexNode dataCoord dataNode)
# etcd lease of every component's session, in seconds (server default 30): how long a killed
# instance's sessions block a restart on its data. Kept alive every third of it.
SESSION_TTL=10
# milvus-server prints this once its own wait on /healthz succeeded (every component healthy);
# the port alone opens seconds after start, long before a restarted server serves.
READY_LINE='Ctrl+C to exit'

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

running() { [[ -f "$PIDFILE" ]] && kill -0 -- "-$(cat "$PIDFILE")" 2>/dev/null; }

# Any socket on the port, TIME_WAIT included (without ss: assume none).
port_busy() { command -v ss >/dev/null && [[ -n "$(ss -Htan "( sport = :$PORT )" 2>/dev/null)" ]]; }

start() {
    if running; then
        echo "milvus already running (process group $(cat "$PIDFILE")) on 127.0.0.1:$PORT"
        return 0
    fi
    if port_open; then
        echo "error: something else already listens on 127.0.0.1:$PORT" >&2
        return 1
    fi
    if [[ ! -x "$VENV/bin/milvus-server" ]]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check 'milvus==2.3.5'
    fi
    # milvus-server checks each default port by binding it without SO_REUSEADDR and takes the
    # next free one when that fails: after a kill, the dead server's connections stay in
    # TIME_WAIT on $PORT for up to 60 s, and it would listen on $((PORT + 1)), where no client
    # looks. Wait them out.
    local waited=0
    while port_busy; do
        ((waited == 0)) && echo "waiting for the old server's connections on port $PORT to close (TIME_WAIT)"
        if ((waited >= 90)); then
            echo "error: port $PORT is still in use:" >&2
            ss -tan "( sport = :$PORT )" >&2
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    [[ "${MILVUS_KEEP_DATA:-0}" == 1 ]] || rm -rf "$DATA"
    mkdir -p "$DATA"
    local args=(--data "$DATA")
    for c in "${COMPONENTS[@]}"; do args+=(--extra-config "$c.ip=127.0.0.1"); done
    args+=(--extra-config "common.session.ttl=$SESSION_TTL")
    # setsid: its own process group (and session), so `stop` ends the server with every
    # process it started and nothing else.
    local started=$SECONDS
    # Unbuffered: its "ready" line must reach the log when printed, not when it exits.
    PYTHONUNBUFFERED=1 setsid "$VENV/bin/milvus-server" "${args[@]}" >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    # setsid makes the child a group leader only once it runs; until then the group is empty.
    sleep 1
    local deadline=$((SECONDS + ${MILVUS_START_TIMEOUT:-180}))
    until port_open && grep -qF "$READY_LINE" "$LOG"; do
        if grep -qF "$READY_LINE" "$LOG" && ! port_open; then
            echo "error: milvus-server serves, but not on $PORT (it was busy); see $LOG" >&2
            stop
            return 1
        fi
        if ! running; then
            echo "error: milvus-server exited during start; its log:" >&2
            tail -30 "$LOG" >&2
            rm -f "$PIDFILE"
            return 1
        fi
        if ((SECONDS > deadline)); then
            echo "error: milvus-server did not serve on 127.0.0.1:$PORT in time; see $LOG" >&2
            stop
            return 1
        fi
        sleep 1
    done
    local note=""
    ((waited == 0)) || note=", after $waited s waiting for the port"
    echo "milvus serving on 127.0.0.1:$PORT after $((SECONDS - started)) s$note (process group $(cat "$PIDFILE"), log $LOG)"
}

check_loopback() {
    if ! running; then
        echo "error: milvus not running: nothing to check" >&2
        return 1
    fi
    python3 "$ROOT/scripts/milvus_loopback.py" --label "milvus process group" "$(cat "$PIDFILE")"
}

stop() {
    if ! running; then
        rm -f "$PIDFILE"
        echo "milvus not running"
        return 0
    fi
    local pgid checked=0
    pgid="$(cat "$PIDFILE")"
    # What the server's connections were until now; it is stopped whatever the check says.
    check_loopback || checked=$?
    # TERM, then KILL after 30 s. (SIGINT, milvus-server's Ctrl+C, stops it in 2 s, but the
    # 2.3.5 server then did not come back on the same data within 3 minutes, while a restart
    # after this sequence did, twice: tests/milvus_store.rs restarts it this way.)
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        kill -0 -- "-$pgid" 2>/dev/null || break
        sleep 1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    rm -f "$PIDFILE"
    echo "milvus stopped (process group $pgid)"
    if ((checked != 0)); then
        echo "error: the loopback check failed (exit $checked) before the stop; see above" >&2
        return 1
    fi
}

kill_now() {
    if running; then
        local pgid
        pgid="$(cat "$PIDFILE")"
        kill -KILL -- "-$pgid" 2>/dev/null || true
        for _ in $(seq 1 30); do
            kill -0 -- "-$pgid" 2>/dev/null || break
            sleep 0.2
        done
        echo "milvus killed (process group $pgid)"
    fi
    rm -f "$PIDFILE"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
kill) kill_now ;;
check-loopback) check_loopback ;;
status)
    if running; then echo "running (process group $(cat "$PIDFILE"))"; else echo "not running"; exit 1; fi
    ;;
*)
    echo "usage: $0 start|stop|kill|status|check-loopback" >&2
    exit 2
    ;;
esac
