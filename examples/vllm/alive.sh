#!/bin/sh
# llmux alive hook for vLLM: exit 0 only if the server on $LLMUX_PORT serves NOW.
# Not /health: a sleeping vLLM answers it with 200 while any chat sent to it hangs.
curl -sf --max-time 5 "http://127.0.0.1:${LLMUX_PORT:?set by llmux}/is_sleeping" \
    | tr -d ' ' | grep -q '"is_sleeping":false'
