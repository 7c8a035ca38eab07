#!/bin/sh
# llmux sleep hook for SGLang: release the GPU memory of the server on $LLMUX_PORT. SGLang
# asserts that nothing is in flight: llmux drains first. Idempotent (see wake.sh's marker).
set -eu
base="http://127.0.0.1:${LLMUX_PORT:?set by llmux}"
state_dir="${LLMUX_STATE_DIR:?set by llmux}"
marker="$state_dir/sglang-${LLMUX_PORT}.released"

[ -e "$marker" ] && exit 0
# The marker must be writable before the memory goes: a failure then leaves the model serving.
mkdir -p "$state_dir"
touch "$marker.pending"
curl -sSf -X POST "$base/release_memory_occupation" -H 'content-type: application/json' \
    -d '{}' >/dev/null
mv "$marker.pending" "$marker"
