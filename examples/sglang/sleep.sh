#!/bin/sh
# llmux sleep hook for SGLang: release the GPU memory of the server on $LLMUX_PORT. SGLang
# asserts that nothing is in flight: llmux drains first. Idempotent (see wake.sh's marker).
set -eu
base="http://127.0.0.1:${LLMUX_PORT:?set by llmux}"
state_dir="${LLMUX_STATE_DIR:-/run/llmux}"
marker="$state_dir/sglang-${LLMUX_PORT}.released"

[ -e "$marker" ] && exit 0
curl -sSf -X POST "$base/release_memory_occupation" -H 'content-type: application/json' \
    -d '{}' >/dev/null
mkdir -p "$state_dir"
touch "$marker"
