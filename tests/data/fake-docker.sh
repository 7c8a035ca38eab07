#!/bin/sh
# Stand-in for the docker CLI in tests: a "container" NAME is a fake-backend process listening on
# the port written in $FAKE_DOCKER_DIR/NAME.port, run by $FAKE_DOCKER_PYTHON.
dir="${FAKE_DOCKER_DIR:?}"
running() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }
cmd="$1"
shift
case "$cmd" in
start)
    if ! running "$1"; then
        "${FAKE_DOCKER_PYTHON:?}" -m llmux fake-backend --awake --name "$1" \
            --port "$(cat "$dir/$1.port")" >"$dir/$1.log" 2>&1 &
        echo $! >"$dir/$1.pid"
    fi
    echo "$1"
    ;;
stop)
    while [ "$1" = -t ]; do shift 2; done
    if running "$1"; then kill "$(cat "$dir/$1.pid")"; fi
    rm -f "$dir/$1.pid"
    echo "$1"
    ;;
inspect)  # inspect -f FORMAT NAME
    if running "$3"; then echo true; else echo false; fi
    ;;
logs)  # logs --tail N NAME
    tail -n 5 "$dir/$3.log"
    ;;
esac
