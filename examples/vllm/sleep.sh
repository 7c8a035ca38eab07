#!/bin/sh
# llmux sleep hook for vLLM in sleep mode: put the server on $LLMUX_PORT to sleep.
# Usage: sleep.sh [LEVEL]  1 offloads weights to CPU RAM (fast wake), 2 discards them (frees RAM
# too; wake.sh 2 reloads them). The level goes in the query string: vLLM ignores a JSON body.
# llmux drains in-flight requests first (vLLM's sleep aborts them). Idempotent.
set -eu
level="${1:-1}"
base="http://127.0.0.1:${LLMUX_PORT:?set by llmux}"
# The deadline is llmux's own timeout for this hook (LLMUX_TIMEOUT_SECS, whole seconds).
timeout_secs="${LLMUX_TIMEOUT_SECS:-120}"
deadline=$(( $(date +%s) + ${timeout_secs%.*} ))

asleep() { curl -sf --max-time 5 "$base/is_sleeping" | tr -d ' ' | grep -q '"is_sleeping":true'; }

asleep && exit 0
curl -sSf -X POST "$base/sleep?level=$level" >/dev/null
until asleep; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "vLLM on port $LLMUX_PORT still awake after ${timeout_secs}s" >&2
        exit 1
    fi
    sleep 0.2
done
