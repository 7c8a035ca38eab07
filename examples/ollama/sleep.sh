#!/bin/sh
# llmux sleep hook for Ollama: unload the model (keep_alive 0) and wait until it is gone.
set -eu
base="http://127.0.0.1:${LLMUX_PORT:?set by llmux}"
model="${OLLAMA_MODEL:-$LLMUX_MODEL}"
# The deadline is llmux's own timeout for this hook (LLMUX_TIMEOUT_SECS, whole seconds).
timeout_secs="${LLMUX_TIMEOUT_SECS:-60}"
deadline=$(( $(date +%s) + ${timeout_secs%.*} ))

loaded() { curl -sf --max-time 5 "$base/api/ps" | tr -d ' ' | grep -qF -e "\"name\":\"$model\"" -e "\"name\":\"$model:"; }

loaded || exit 0
curl -sSf "$base/api/generate" -d "{\"model\": \"$model\", \"keep_alive\": 0}" >/dev/null
while loaded; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "Ollama still holds $model after ${timeout_secs}s" >&2
        exit 1
    fi
    sleep 0.2
done
