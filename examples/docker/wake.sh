#!/bin/sh
# llmux wake hook for a model server in a container: start it and return once its health
# endpoint answers. CONTAINER names it; DOCKER picks the CLI (docker, podman); HEALTH_PATH is
# the server's health check (default /health). Idempotent: `start` on a running one is a no-op.
set -eu
docker="${DOCKER:-docker}"
container="${CONTAINER:?set CONTAINER to the container name}"
health="http://127.0.0.1:${LLMUX_PORT:?set by llmux}${HEALTH_PATH:-/health}"
# The deadline is llmux's own timeout for this hook (LLMUX_TIMEOUT_SECS, whole seconds).
timeout_secs="${LLMUX_TIMEOUT_SECS:-300}"
deadline=$(( $(date +%s) + ${timeout_secs%.*} ))

"$docker" start "$container" >/dev/null
until curl -sf --max-time 5 "$health" >/dev/null; do
    if [ "$("$docker" inspect -f '{{.State.Running}}' "$container")" != true ]; then
        echo "container $container stopped during start-up:" >&2
        "$docker" logs --tail 5 "$container" >&2 || true
        exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "container $container not healthy after ${timeout_secs}s" >&2
        exit 1
    fi
    sleep 0.5
done
