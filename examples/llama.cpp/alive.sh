#!/bin/sh
# llmux alive hook: serving now = the process start.sh started runs and answers its health check.
pidfile="${LLMUX_STATE_DIR:?set by llmux}/llama-${LLMUX_PORT:?set by llmux}.pid"
[ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null &&
    curl -sf --max-time 5 "http://127.0.0.1:${LLMUX_PORT}${HEALTH_PATH:-/health}" >/dev/null
