#!/bin/sh
# llmux sleep hook that stops the server start.sh started, with every process it spawned (its
# session): SIGTERM, then SIGKILL after STOP_DEADLINE_SECS (30). Leaves nothing behind; idempotent.
set -eu
pidfile="${LLMUX_STATE_DIR:?set by llmux}/llama-${LLMUX_PORT:?set by llmux}.pid"
[ -f "$pidfile" ] || exit 0
pid="$(cat "$pidfile")"
if kill -0 -"$pid" 2>/dev/null; then
    kill -TERM -"$pid"
    deadline=$(( $(date +%s) + ${STOP_DEADLINE_SECS:-30} ))
    while kill -0 -"$pid" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            kill -KILL -"$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
fi
rm -f "$pidfile"
