#!/bin/sh
# llmux wake hook for Ollama: load the model (an empty generate request with keep_alive -1, so
# Ollama's own idle timer never unloads it) and return once /api/ps lists it. All Ollama models
# share one port. OLLAMA_MODEL names the model in Ollama (default: llmux's model name).
set -eu
base="http://127.0.0.1:${LLMUX_PORT:?set by llmux}"
model="${OLLAMA_MODEL:-$LLMUX_MODEL}"
# The deadline is llmux's own timeout for this hook (LLMUX_TIMEOUT_SECS, whole seconds).
timeout_secs="${LLMUX_TIMEOUT_SECS:-300}"
deadline=$(( $(date +%s) + ${timeout_secs%.*} ))

loaded() { curl -sf --max-time 5 "$base/api/ps" | tr -d ' ' | grep -qF -e "\"name\":\"$model\"" -e "\"name\":\"$model:"; }

loaded && exit 0
curl -sSf --max-time "${timeout_secs}" "$base/api/generate" \
    -d "{\"model\": \"$model\", \"keep_alive\": -1}" >/dev/null
until loaded; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "Ollama did not load $model within ${timeout_secs}s" >&2
        exit 1
    fi
    sleep 0.2
done
