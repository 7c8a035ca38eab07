#!/bin/sh
# llmux wake hook for SGLang (started with --enable-memory-saver): resume the GPU memory of the
# server on $LLMUX_PORT and return once it answers /health. SGLang cannot tell whether its memory
# is released, so sleep.sh leaves a marker file in $LLMUX_STATE_DIR (llmux's state folder) and this
# hook removes it. Idempotent: no marker means the memory is held already.
set -eu
base="http://127.0.0.1:${LLMUX_PORT:?set by llmux}"
marker="${LLMUX_STATE_DIR:?set by llmux}/sglang-${LLMUX_PORT}.released"
# The deadline is llmux's own timeout for this hook (LLMUX_TIMEOUT_SECS, whole seconds).
timeout_secs="${LLMUX_TIMEOUT_SECS:-300}"
deadline=$(( $(date +%s) + ${timeout_secs%.*} ))

if [ -e "$marker" ]; then
    curl -sSf -X POST "$base/resume_memory_occupation" -H 'content-type: application/json' \
        -d '{}' >/dev/null
    rm -f "$marker"
fi
until curl -sf --max-time 5 "$base/health" >/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "SGLang on port $LLMUX_PORT not healthy after ${timeout_secs}s" >&2
        exit 1
    fi
    sleep 0.2
done
