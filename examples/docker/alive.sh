#!/bin/sh
# llmux alive hook: serving now = the container runs and its server answers the health check.
[ "$("${DOCKER:-docker}" inspect -f '{{.State.Running}}' "${CONTAINER:?set CONTAINER}" 2>/dev/null)" = true ] &&
    curl -sf --max-time 5 "http://127.0.0.1:${LLMUX_PORT:?set by llmux}${HEALTH_PATH:-/health}" >/dev/null
