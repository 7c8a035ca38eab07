#!/bin/sh
# llmux sleep hook for a containerised model server: stop the container (SIGTERM, then SIGKILL
# after STOP_TIMEOUT seconds). Idempotent: stopping a stopped container is a no-op.
set -eu
"${DOCKER:-docker}" stop -t "${STOP_TIMEOUT:-30}" "${CONTAINER:?set CONTAINER}" >/dev/null
