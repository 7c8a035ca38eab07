#!/bin/sh
# llmux sleep hook that stops the server start.sh started: SIGTERM, then SIGKILL after
# STOP_DEADLINE_SECS (30). Leaves no process behind; idempotent.
set -eu
pidfile="${LLMUX_STATE_DIR:-/run/llmux}/llama-${LLMUX_PORT:?set by llmux}.pid"
[ -f "$pidfile" ] || exit 0
pid="$(cat "$pidfile")"
if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    deadline=$(( $(date +%s) + ${STOP_DEADLINE_SECS:-30} ))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
fi
rm -f "$pidfile"
