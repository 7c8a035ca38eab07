#!/bin/sh
# llmux alive hook for Ollama: serving now = the model is loaded (listed by /api/ps).
curl -sf --max-time 5 "http://127.0.0.1:${LLMUX_PORT:?set by llmux}/api/ps" | tr -d ' ' |
    grep -qF "\"name\":\"${OLLAMA_MODEL:-$LLMUX_MODEL}\""
