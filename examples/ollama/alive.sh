#!/bin/sh
# llmux alive hook for Ollama: serving now = the model is loaded (listed by /api/ps, which names
# models with their tag: `llama3.1` is listed as `llama3.1:latest`).
model="${OLLAMA_MODEL:-$LLMUX_MODEL}"
curl -sf --max-time 5 "http://127.0.0.1:${LLMUX_PORT:?set by llmux}/api/ps" | tr -d ' ' |
    grep -qF -e "\"name\":\"$model\"" -e "\"name\":\"$model:"
