#!/bin/sh
# llmux wake hook for vLLM in sleep mode: wake the server on $LLMUX_PORT, return once it serves.
# Usage: wake.sh [LEVEL]  LEVEL 2 (weights were discarded): wake weights, reload them, wake the
# KV cache. Idempotent: an awake server is left alone. A server still loading after a boot is
# waited for. Every wait ends at the hook's own timeout (LLMUX_TIMEOUT_SECS).
set -eu
level="${1:-1}"
base="http://127.0.0.1:${LLMUX_PORT:?set by llmux}"
# The deadline is llmux's own timeout for this hook (LLMUX_TIMEOUT_SECS, whole seconds).
timeout_secs="${LLMUX_TIMEOUT_SECS:-300}"
deadline=$(( $(date +%s) + ${timeout_secs%.*} ))

awake() { curl -sf --max-time 5 "$base/is_sleeping" | tr -d ' ' | grep -q '"is_sleeping":false'; }
past_deadline() {
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "vLLM on port $LLMUX_PORT $1 after ${timeout_secs}s" >&2
        exit 1
    fi
}

# Right after a boot vLLM may still be loading: wait until it answers at all.
until curl -s -o /dev/null --max-time 5 "$base/health"; do
    past_deadline "does not answer"
    sleep 0.5
done
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
    past_deadline "is still asleep"
    sleep 0.2
done
