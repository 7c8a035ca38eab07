#!/bin/sh
# llmux wake hook for vLLM in sleep mode: wake the server on $LLMUX_PORT, return once it serves.
# Usage: wake.sh [LEVEL]  LEVEL 2 (weights were discarded): wake weights, reload them, wake the
# KV cache. Idempotent: an awake server is left alone. WAKE_DEADLINE_SECS bounds the wait (300).
set -eu
level="${1:-1}"
base="http://127.0.0.1:${LLMUX_PORT:?set by llmux}"
deadline=$(( $(date +%s) + ${WAKE_DEADLINE_SECS:-300} ))

awake() { curl -sf --max-time 5 "$base/is_sleeping" | tr -d ' ' | grep -q '"is_sleeping":false'; }

awake && exit 0
if [ "$level" = 2 ]; then
    curl -sSf -X POST "$base/wake_up?tags=weights" >/dev/null
    curl -sSf -X POST "$base/collective_rpc" -H 'content-type: application/json' \
        -d '{"method": "reload_weights"}' >/dev/null
    curl -sSf -X POST "$base/wake_up?tags=kv_cache" >/dev/null
else
    curl -sSf -X POST "$base/wake_up" >/dev/null
fi
until awake; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "vLLM on port $LLMUX_PORT still asleep after ${WAKE_DEADLINE_SECS:-300}s" >&2
        exit 1
    fi
    sleep 0.2
done
