#!/bin/sh
# llmux alive hook for SGLang: serving now = healthy and its memory not released by sleep.sh.
[ ! -e "${LLMUX_STATE_DIR:?set by llmux}/sglang-${LLMUX_PORT:?set by llmux}.released" ] &&
    curl -sf --max-time 5 "http://127.0.0.1:${LLMUX_PORT}/health" >/dev/null
