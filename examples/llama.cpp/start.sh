#!/bin/sh
# llmux wake hook that starts a llama.cpp server process (a cold start) and returns once it
# serves. The pid goes to $LLMUX_STATE_DIR (llmux's state folder), its output to a log file there
# (never to llmux's hook capture). Idempotent: a running, healthy server is left alone. If it
# does not become healthy within the hook's timeout, it is stopped and the hook fails.
#
# Env: MODEL (the .gguf file), LLAMA_ARGS (extra flags), or SERVER_CMD for a whole command line;
# HEALTH_PATH (default /health; llama-cpp-python has none: use /v1/models).
set -eu
port="${LLMUX_PORT:?set by llmux}"
state_dir="${LLMUX_STATE_DIR:?set by llmux}"
pidfile="$state_dir/llama-$port.pid"
log="$state_dir/llama-$port.log"
health="http://127.0.0.1:$port${HEALTH_PATH:-/health}"
# The deadline is llmux's own timeout for this hook (LLMUX_TIMEOUT_SECS, whole seconds).
timeout_secs="${LLMUX_TIMEOUT_SECS:-120}"
deadline=$(( $(date +%s) + ${timeout_secs%.*} ))

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

if running && curl -sf --max-time 5 "$health" >/dev/null; then exit 0; fi
mkdir -p "$state_dir"
if ! running; then
    cmd="${SERVER_CMD:-llama-server -m ${MODEL:?set MODEL to the .gguf file} --host 127.0.0.1 --port $port ${LLAMA_ARGS:-}}"
    # A session of its own, so that stop.sh can stop the server with every process it spawns.
    setsid sh -c "exec $cmd" >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    # If llmux stops this hook (its wake timeout), do not leave a half-started server behind.
    trap 'kill -TERM -"$(cat "$pidfile")" 2>/dev/null; rm -f "$pidfile"; exit 1' TERM INT
fi
until curl -sf --max-time 5 "$health" >/dev/null; do
    if ! running; then
        echo "server on port $port exited during start-up; last lines of $log:" >&2
        tail -n 5 "$log" >&2
        rm -f "$pidfile"
        exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "server on port $port not healthy after ${timeout_secs}s; stopping it" >&2
        kill -TERM -"$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
        exit 1
    fi
    sleep 0.2
done
